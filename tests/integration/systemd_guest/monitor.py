"""Guest-side helper: talk to acrn-pydm's command monitor as a user's tool would.

    monitor.py SOCKET CMD...   send {"cmd": CMD} per CMD ("poweroff-force" adds force), print
                               each reply line
    monitor.py --connect SOCKET   connect to a UNIX stream socket and say so (console ports)
"""

import json
import socket
import sys


def main(argv: list[str]) -> int:
    if argv[0] == "--connect":
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(argv[1])
        print(f"connected {argv[1]}")
        return 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(argv[0])
        reader = s.makefile("r")
        for cmd in argv[1:]:
            req = {"cmd": "poweroff", "force": True} if cmd == "poweroff-force" else {"cmd": cmd}
            s.sendall(json.dumps(req).encode() + b"\n")
            print(reader.readline().strip())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
