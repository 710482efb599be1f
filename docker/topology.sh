#!/usr/bin/env bash
# The topology of libp2p's hole-punch test, in Docker, with bitnode's devices (groundwork for issue 6's
# scenarios):
#
#   "internet" 10.87.0.0/24:  relay .2, intruder .66, router A wan .11, router B wan .12
#   LAN A 10.88.1.0/24 behind router A (.254):  phone .2 (0.3 CPU), laptop .3
#   LAN B 10.88.2.0/24 behind router B (.254):  desktop .2
#
# No container has a route off the machine (the internet network is --internal; LAN hosts route through
# their router, which has no default route): only the containers' own networks are addressed. Routers (NET_ADMIN) masquerade outbound flows (MASQUERADE keeps the source port when it is
# free: endpoint-independent mapping), admit inbound only for flows the inside started, and delay their
# wan by NETEM_DELAY (default 20ms) where the kernel has netem.
#
#   docker/topology.sh up        # image from docker/image.sh, or BITNODE_IMAGE
#   docker/topology.sh down
#   docker exec bntopo-phone bitnode peers
set -euo pipefail
img="${BITNODE_IMAGE:-bitnode:local}"
p="${BN_PREFIX:-bntopo}"
delay="${NETEM_DELAY:-20ms}"
listen=(--listen /ip4/0.0.0.0/tcp/7878 --listen /ip4/0.0.0.0/udp/7878/quic-v1)

down() {
    docker rm -f "$p-relay" "$p-intruder" "$p-phone" "$p-laptop" "$p-desktop" "$p-router-a" "$p-router-b" \
        >/dev/null 2>&1 || true
    for n in internet lan-a lan-b; do docker network rm "$p-$n" >/dev/null 2>&1 || true; done
    for d in relay intruder phone laptop desktop; do docker volume rm "$p-$d" >/dev/null 2>&1 || true; done
}

# A device: on its network at its address; behind a router, its default route goes through the router.
device() {
    local name=$1 net=$2 ip=$3 gw=$4; shift 4
    local route=""
    [ -n "$gw" ] && route="ip route replace default via $gw && "
    docker run -d --name "$p-$name" --hostname "$name" --network "$p-$net" --ip "$ip" --cap-add NET_ADMIN \
        -e BITNODE_LOG="${BITNODE_LOG:-info}" -v "$p-$name:/data" "$@" --entrypoint sh "$img" -c "${route}exec bitnode start ${listen[*]} ${EXTRA_ARGS:-}" \
        >/dev/null
}

up() {
    down
    docker network create --internal --subnet 10.87.0.0/24 "$p-internet" >/dev/null
    # The LANs cannot be --internal: Docker then drops (on the host's bridge, through br_netfilter) every
    # frame whose destination is outside the LAN, the router's traffic included. Their hosts route through
    # the router instead of Docker's gateway, and the routers drop Docker's default route.
    docker network create --subnet 10.88.1.0/24 "$p-lan-a" >/dev/null
    docker network create --subnet 10.88.2.0/24 "$p-lan-b" >/dev/null
    for r in a b; do
        local n=1; [ "$r" = b ] && n=2
        docker create --name "$p-router-$r" --hostname "router-$r" --cap-add NET_ADMIN \
            --sysctl net.ipv4.ip_forward=1 --network "$p-internet" --ip "10.87.0.1$n" \
            --entrypoint sleep "$img" infinity >/dev/null
        docker network connect --ip "10.88.$n.254" "$p-lan-$r" "$p-router-$r"
        docker start "$p-router-$r" >/dev/null
        docker exec "$p-router-$r" sh -c "
            set -e
            ip route del default 2>/dev/null || true
            wan=\$(ip -o -4 addr show | awk '/ 10\\.87\\.0\\./ {print \$2; exit}')
            lan=\$(ip -o -4 addr show | awk '/ 10\\.88\\./ {print \$2; exit}')
            iptables -t nat -A POSTROUTING -o \$wan -j MASQUERADE
            iptables -A FORWARD -i \$lan -o \$wan -j ACCEPT
            iptables -A FORWARD -i \$wan -o \$lan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
            iptables -A FORWARD -i \$wan -o \$lan -j DROP
            iptables -A INPUT -i \$wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
            iptables -A INPUT -i \$wan -j DROP
            tc qdisc add dev \$wan root netem delay $delay 2>/dev/null || echo 'router-$r: no netem in this kernel'
        "
    done
    EXTRA_ARGS=--relay-server device relay internet 10.87.0.2 ""
    device intruder internet 10.87.0.66 ""
    device phone lan-a 10.88.1.2 10.88.1.254 --cpus 0.3
    device laptop lan-a 10.88.1.3 10.88.1.254
    device desktop lan-b 10.88.2.2 10.88.2.254
    for d in relay intruder phone laptop desktop; do
        for _ in $(seq 100); do docker exec "$p-$d" bitnode status >/dev/null 2>&1 && break; sleep 0.2; done
    done
    echo "up: $p-{relay,intruder,phone,laptop,desktop} and $p-router-{a,b}"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
