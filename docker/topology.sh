#!/usr/bin/env bash
# The topology of libp2p's hole-punch test, in Docker, with bitnode's devices. The scenarios of
# node/tests/docker run on it; users can bring it up by hand to try the mesh across NATs.
#
#   "internet" 10.87.0.0/24:  relay .2, intruder .66, router A wan .11, router B wan .12
#   LAN A 10.88.1.0/24 behind router A (.254):  phone .2 (0.3 CPU), laptop .3 (0.6 CPU)
#   LAN B 10.88.2.0/24 behind router B (.254):  desktop .2 (no CPU limit: the strongest, on merit)
#
# No container has a route off the machine (the internet network is --internal; LAN hosts route through
# their router, which has no default route): only the containers' own networks are addressed. Routers
# (NET_ADMIN) masquerade outbound flows (MASQUERADE keeps the source port when it is free: endpoint-
# independent mapping; NAT=symmetric picks a random port per flow instead), admit inbound only for flows
# the inside started, and delay their wan by NETEM_DELAY (default 20ms) where the kernel has netem.
# Capabilities are measured, not pinned: devices start one after another so each one's probe runs alone.
#
#   docker/topology.sh up            # the image from docker/image.sh (bitnode:local), or BITNODE_IMAGE
#   docker/topology.sh logs DIR      # every container's log, status, peers, jobs; the routers' counters
#   docker/topology.sh down          # containers, networks and volumes
#   docker exec bntopo-phone bitnode peers
#
# BN_PREFIX (default bntopo) names everything this script creates; BITNODE_LOG sets the daemons' log filter.
set -euo pipefail
img="${BITNODE_IMAGE:-bitnode:local}"
p="${BN_PREFIX:-bntopo}"
delay="${NETEM_DELAY:-20ms}"
devices=(relay intruder phone laptop desktop)
containers=("${devices[@]}" router-a router-b)
listen="--listen /ip4/0.0.0.0/tcp/7878 --listen /ip4/0.0.0.0/udp/7878/quic-v1"

down() {
    for c in "${containers[@]}"; do docker rm -f -v "$p-$c" >/dev/null 2>&1 || true; done
    for n in internet lan-a lan-b; do docker network rm "$p-$n" >/dev/null 2>&1 || true; done
    for d in "${devices[@]}"; do docker volume rm "$p-$d" >/dev/null 2>&1 || true; done
}

# Waits until the device's daemon answers on its control socket (its capability probe is done by then).
wait_ready() {
    for _ in $(seq 150); do
        docker exec "$p-$1" bitnode status >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "$p-$1: the daemon did not come up" >&2
    docker logs --tail 50 "$p-$1" >&2 || true
    return 1
}

# A device: on its network at its address; behind a router, its default route goes through the router.
# Its home (identity, trust list, job table, model store) is a named volume, so a restart keeps it.
device() {
    local name=$1 net=$2 ip=$3 gw=$4 args=$5; shift 5
    local route=""
    [ -n "$gw" ] && route="ip route replace default via $gw && "
    docker run -d --name "$p-$name" --hostname "$name" --network "$p-$net" --ip "$ip" --cap-add NET_ADMIN \
        -e BITNODE_LOG="${BITNODE_LOG:-info}" -v "$p-$name:/data" "$@" --entrypoint sh "$img" \
        -c "${route}exec bitnode start $listen $args" >/dev/null
    wait_ready "$name"
}

router() {
    local r=$1 n=$2
    local masq="-j MASQUERADE"
    [ "${NAT:-}" = symmetric ] && masq="-j MASQUERADE --random-fully"
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
        iptables -t nat -A POSTROUTING -o \$wan $masq
        iptables -A FORWARD -i \$lan -o \$wan -j ACCEPT
        iptables -A FORWARD -i \$wan -o \$lan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
        iptables -A FORWARD -i \$wan -o \$lan -j DROP
        # Unsolicited packets to the router itself are dropped too: a refused dial to the router's
        # address would fail a join at once, before the relayed dial wins.
        iptables -A INPUT -i \$wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
        iptables -A INPUT -i \$wan -j DROP
        tc qdisc add dev \$wan root netem delay $delay 2>/dev/null || echo 'router-$r: no netem in this kernel'
    "
}

up() {
    down
    docker network create --internal --subnet 10.87.0.0/24 "$p-internet" >/dev/null
    # The LANs cannot be --internal: Docker then drops (on the host's bridge, through br_netfilter) every
    # frame whose destination is outside the LAN, the router's traffic included. Their hosts route through
    # the router instead of Docker's gateway, and the routers drop Docker's default route.
    docker network create --subnet 10.88.1.0/24 "$p-lan-a" >/dev/null
    docker network create --subnet 10.88.2.0/24 "$p-lan-b" >/dev/null
    router a 1
    router b 2
    # The relay only relays: it takes no jobs, so it never competes with the devices it serves.
    device relay internet 10.87.0.2 "" "--relay-server --no-remote-jobs"
    device intruder internet 10.87.0.66 "" ""
    device desktop lan-b 10.88.2.2 10.88.2.254 ""
    device laptop lan-a 10.88.1.3 10.88.1.254 "" --cpus 0.6
    device phone lan-a 10.88.1.2 10.88.1.254 "" --cpus 0.3
    echo "up: $p-{relay,intruder,phone,laptop,desktop} and $p-router-{a,b}"
}

logs() {
    local dir=$1
    mkdir -p "$dir"
    for c in "${containers[@]}"; do
        docker logs "$p-$c" >"$dir/$c.log" 2>&1 || echo "no container $p-$c" >"$dir/$c.log"
    done
    for d in "${devices[@]}"; do
        for q in status peers jobs; do
            timeout 10 docker exec "$p-$d" bitnode "$q" --json >"$dir/$d.$q.json" 2>&1 || true
        done
    done
    for r in a b; do
        timeout 10 docker exec "$p-router-$r" sh -c 'iptables -L -v -n; iptables -t nat -L -v -n; ip addr' \
            >"$dir/router-$r.iptables" 2>&1 || true
    done
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    logs) logs "${2:?usage: $0 logs DIR}" ;;
    *) echo "usage: $0 up|logs DIR|down" >&2; exit 2 ;;
esac
