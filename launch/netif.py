"""The network interface that reaches a given host, for GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME.

    python launch/netif.py node1          # "eth1 remote": the interface, and where node1 is (local,
                                          # remote or loopback); exits 1 when no interface reaches it

Without these variables gloo binds the address its hostname resolves to, and NCCL the first
interface it likes. On a node with a management network, a bridge or a loopback alias for the
hostname, that address may be one the peers cannot reach, and the job hangs at its first collective.
The interface whose address the kernel would send from, towards the rendezvous host, is one the peers
reach. Asking costs no traffic: connecting a UDP socket only looks the route up. Standard library
only, so the shell launcher can run it by path before any package is importable.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
SIOCGIFADDR = 0x8915


def route(host: str) -> tuple[str, str]:
    """``host``'s address, and the local address that traffic to it leaves from (the same when it is local)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(sockaddr)
        return sockaddr[0], s.getsockname()[0]


def _ipv4_of(name: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            reply = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:  # no IPv4 address on it
            return None
    return socket.inet_ntoa(reply[20:24])


def _ipv6_interfaces() -> dict[str, str]:
    table = Path("/proc/net/if_inet6")
    if not table.exists():
        return {}
    rows = (line.split() for line in table.read_text().splitlines())
    return {str(ipaddress.IPv6Address(bytes.fromhex(r[0]))): r[5] for r in rows if len(r) == 6}


def interface_of(address: str) -> str | None:
    """The name of the interface that holds ``address``."""
    ip = ipaddress.ip_address(address.partition("%")[0])
    if ip.version == 6:
        return _ipv6_interfaces().get(str(ip))
    return next((name for _, name in socket.if_nameindex() if _ipv4_of(name) == str(ip)), None)


def reach(host: str) -> tuple[str, str]:
    """The interface that reaches ``host``, and where ``host`` is: local, remote or loopback.
    Raises OSError saying why when ``host`` does not resolve or no interface reaches it."""
    try:
        address, source = route(host)
    except OSError as e:
        raise OSError(f"no route ({e})") from None
    name = interface_of(source)
    if name is None:
        raise OSError(f"no interface holds the source address {source}")
    if ipaddress.ip_address(address.partition("%")[0]).is_loopback:
        return name, "loopback"
    return name, "local" if address == source else "remote"


def route_interface(host: str) -> str | None:
    """The interface that reaches ``host``; None when none does."""
    try:
        return reach(host)[0]
    except OSError:
        return None


def socket_ifname(host: str, env: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to ``env``: those it lacks, set to the interface that reaches ``host``.

    A user's own setting (even an empty one) is kept. A loopback answer is kept too: it is right when
    every rank is on this host, and a peer elsewhere that cannot reach it fails at once, not silently.
    """
    missing = [v for v in VARIABLES if v not in env]
    name = route_interface(host) if missing else None
    return dict.fromkeys(missing, name) if name else {}


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: python launch/netif.py HOST", file=sys.stderr)
        return 2
    try:
        name, where = reach(argv[0])
    except OSError as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        return 1
    print(name, where)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
