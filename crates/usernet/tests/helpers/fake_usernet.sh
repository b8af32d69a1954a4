#!/bin/bash
# A stand-in for `usernet run`, made of unshare, pasta, nftables and dnsmasq,
# to check the integration tests themselves while usernet's engine is not there:
#
#   USERNET_TEST_BIN=$PWD/tests/helpers/fake_usernet.sh cargo test --release --test run_dns
#
# It copies only the observable contract of `usernet run` (guest 192.168.65.2/24,
# gateway .1 with DNS, host loopback at .254, exit statuses, cleanup), roughly:
# pasta maps the gateway to the host's loopback, so nft DNATs .254 to .1 and
# DNS to the gateway to a dnsmasq inside the namespace, which forwards to the
# --dns-upstream addresses through the gateway. It is not part of the product.
set -u

fail() { echo "usernet: $*" >&2; exit 125; }
[ "${1:-}" = run ] || fail "fake supports only: run"
shift
ups=(); hosts=(); mtu=65520; pcap=
while [ $# -gt 0 ]; do
  case "$1" in
    --dns-upstream) [ $# -ge 2 ] || fail "--dns-upstream needs a value"; ups+=("$2"); shift 2 ;;
    --add-host) [ $# -ge 2 ] || fail "--add-host needs a value"; hosts+=("$2"); shift 2 ;;
    --mtu) [ $# -ge 2 ] || fail "--mtu needs a value"; mtu=$2; shift 2 ;;
    --pcap) [ $# -ge 2 ] || fail "--pcap needs a value"; pcap=$2; shift 2 ;;
    --) shift; break ;;
    *) fail "unexpected argument '$1'" ;;
  esac
done
[ $# -gt 0 ] || fail "the following required arguments were not provided: <COMMAND>..."
case "$mtu" in ''|*[!0-9]*) fail "invalid mtu $mtu" ;; esac
[ "$mtu" -ge 576 ] && [ "$mtu" -le 65520 ] || fail "invalid mtu $mtu"
ipv4='^([0-9]{1,3}\.){3}[0-9]{1,3}$'

tmp=$(mktemp -d /tmp/fake-usernet.XXXXXX)
chmod 755 "$tmp"
dn=(--conf-file=/dev/null --no-resolv --no-hosts --user= --group=
    --pid-file="$tmp/dnsmasq.pid" --listen-address=192.168.65.53 --bind-interfaces
    --port=53 --strict-order --local=/docker.internal/ --local=/containers.internal/
    --host-record=host.docker.internal,192.168.65.254
    --host-record=host.containers.internal,192.168.65.254
    --host-record=gateway.docker.internal,192.168.65.1
    --host-record=gateway.containers.internal,192.168.65.1)
for h in "${hosts[@]+"${hosts[@]}"}"; do
  name=${h%:*}; ip=${h##*:}
  [ "$name" != "$h" ] && [ -n "$name" ] || { rm -rf "$tmp"; fail "invalid argument \"$h\" for \"--add-host\" flag"; }
  [ "$ip" = host-gateway ] && ip=192.168.65.254
  [[ $ip =~ $ipv4 ]] || { rm -rf "$tmp"; fail "invalid argument \"$h\" for \"--add-host\" flag: invalid IP address: $ip"; }
  dn+=(--host-record="$name,$ip")
done
for u in "${ups[@]+"${ups[@]}"}"; do
  dn+=(--server="192.168.65.1#${u##*:}")   # loopback upstreams only, through the gateway
done
echo "nameserver 192.168.65.1" > "$tmp/resolv.conf"
cat > "$tmp/nat.nft" <<'NFT'
table ip fakeusernet {
  chain out {
    type nat hook output priority -100;
    ip daddr 192.168.65.254 dnat to 192.168.65.1
    ip daddr 192.168.65.1 udp dport 53 dnat to 192.168.65.53
    ip daddr 192.168.65.1 tcp dport 53 dnat to 192.168.65.53
  }
}
NFT
printf '%s\0' "${dn[@]}" > "$tmp/dnsmasq.args"
cat > "$tmp/inner.sh" <<'INNER'
tmp=$1; shift
i=0; while [ ! -e "$tmp/ready" ] && [ $i -lt 500 ]; do sleep 0.02; i=$((i+1)); done
ip link set lo up
ip addr add 192.168.65.53/32 dev lo
nft -f "$tmp/nat.nft" || exit 125
xargs -0 dnsmasq < "$tmp/dnsmasq.args" || exit 125
mount --bind "$tmp/resolv.conf" /etc/resolv.conf || exit 125
exec "$@"
INNER

unshare -rUnm --propagation private sh "$tmp/inner.sh" "$tmp" "$@" &
child=$!
netns=
for _ in $(seq 100); do
  netns=$(readlink /proc/$child/ns/net 2>/dev/null)
  [ -n "$netns" ] && [ "$netns" != "$(readlink /proc/self/ns/net)" ] && break
  sleep 0.01
done
runas=(); [ "$(id -u)" = 0 ] && runas=(--runas 0:0)
pasta --config-net -a 192.168.65.2 -n 24 -g 192.168.65.1 -m "$mtu" "${runas[@]}" \
  -t none -u none -T none -U none ${pcap:+--pcap "$pcap"} -P "$tmp/pasta.pid" -q "$child" \
  >/dev/null 2>&1 || { kill -9 $child; rm -rf "$tmp"; fail "pasta failed"; }
touch "$tmp/ready"
trap 'kill -TERM $child 2>/dev/null' TERM INT
wait $child; rc=$?
# A signal interrupts wait: wait for the command for real.
while kill -0 $child 2>/dev/null; do wait $child; rc=$?; done
# Nothing may outlive the command: kill whatever is left in its namespace.
for p in /proc/[0-9]*; do
  [ "$(readlink $p/ns/net 2>/dev/null)" = "$netns" ] && kill -9 "${p#/proc/}" 2>/dev/null
done
[ -s "$tmp/pasta.pid" ] && kill "$(cat "$tmp/pasta.pid")" 2>/dev/null
rm -rf "$tmp"
exit $rc
