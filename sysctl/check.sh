#!/usr/bin/env bash
# Compare the running kernel with sysctl/99-chatd.conf; with --apply, install
# the file into /etc/sysctl.d and load it (needs root). Exit 1 when a value is
# short of the recommendation and --apply was not given.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
conf="$here/99-chatd.conf"
apply=0
[ "${1:-}" = "--apply" ] && apply=1

low=0
while IFS='=' read -r key want; do
    key=$(echo "$key" | xargs); want=$(echo "$want" | xargs)
    [ -z "$key" ] && continue
    path=/proc/sys/${key//./\/}
    if [ ! -r "$path" ]; then
        printf '%-34s %-28s %s\n' "$key" "(not readable here)" "want $want"
        continue
    fi
    have=$(tr -s '\t ' ' ' < "$path")
    # compare the first number of each (ranges and triples: the last number)
    h=${have##* }; w=${want##* }
    if [ "$key" = net.ipv4.ip_local_port_range ]; then h=$((${have##* } - ${have%% *})); w=$((${want##* } - ${want%% *})); fi
    case "$key" in
        # timers: shorter is what we want
        net.ipv4.tcp_keepalive_*) if [ "$h" -gt "$w" ]; then status=HIGH; low=1; else status=ok; fi ;;
        *) if [ "$h" -lt "$w" ]; then status=LOW; low=1; else status=ok; fi ;;
    esac
    printf '%-34s %-28s want %-24s %s\n' "$key" "$have" "$want" "$status"
done < <(grep -E '^[a-z]' "$conf")

echo "open files for this shell: soft $(ulimit -Sn), hard $(ulimit -Hn) (the unit sets LimitNOFILE=1048576)"

if [ $apply -eq 1 ]; then
    install -m 0644 "$conf" /etc/sysctl.d/99-chatd.conf
    sysctl --load /etc/sysctl.d/99-chatd.conf
    exit 0
fi
exit $low
