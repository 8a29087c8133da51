"""Hand-built trackd frames for tests that must send what the shim never would."""
import os
import socket
import struct
import subprocess


def mp(obj):
    """A minimal msgpack encoder: None, bool, int, float, str, list."""
    if obj is None:
        return b"\xc0"
    if obj is True or obj is False:
        return b"\xc3" if obj else b"\xc2"
    if isinstance(obj, int):
        if 0 <= obj < 128:
            return bytes([obj])
        if obj >= 0:
            return b"\xcf" + struct.pack(">Q", obj)
        return b"\xd3" + struct.pack(">q", obj)
    if isinstance(obj, float):
        return b"\xcb" + struct.pack(">d", obj)
    if isinstance(obj, str):
        b = obj.encode()
        return (bytes([0xa0 | len(b)]) if len(b) < 32 else b"\xdb" + struct.pack(">I", len(b))) + b
    if isinstance(obj, list):
        return b"\xdd" + struct.pack(">I", len(obj)) + b"".join(mp(x) for x in obj)
    raise TypeError(obj)


KINDS = {"hello": 1, "welcome": 2, "experiment": 3, "start_run": 4, "metric": 5, "metrics": 6,
         "params": 7, "tags": 8, "end_run": 9, "flush": 10, "flushed": 11, "error": 12,
         "stats": 13, "ack": 17, "artifact": 18}


def frame(kind, body, seq=1, magic=b"TK", version=1):
    payload = mp(body) if not isinstance(body, bytes) else body
    return magic + bytes([version, KINDS[kind]]) + struct.pack(">IQ", len(payload), seq) + payload


class Raw:
    """A raw client socket that reads replies as (kind, seq, body bytes)."""

    def __init__(self, path, timeout=10):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.buf = b""

    @classmethod
    def connected_as(cls, path, uid, gid, n=1, timeout=10):
        """n connections made by a process running as uid:gid, handed back to this one. The
        agent sees uid: SO_PEERCRED is taken when the client connects."""
        mine, theirs = socket.socketpair()
        code = ("import socket, sys\n"
                "back = socket.socket(fileno=int(sys.argv[1]))\n"
                "for _ in range(int(sys.argv[3])):\n"
                "    s = socket.socket(socket.AF_UNIX)\n"
                "    s.connect(sys.argv[2])\n"
                "    socket.send_fds(back, [b'c'], [s.fileno()])\n")

        def drop():
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        # The system's Python: a virtual environment may live where uid cannot read.
        subprocess.run(["/usr/bin/python3", "-c", code, str(theirs.fileno()), path, str(n)],
                       pass_fds=[theirs.fileno()], preexec_fn=drop, check=True, timeout=60,
                       cwd="/")
        theirs.close()
        out = []
        for _ in range(n):
            _, fds, _, _ = socket.recv_fds(mine, 1, 1)
            r = cls.__new__(cls)
            r.s = socket.socket(fileno=fds[0])
            r.s.settimeout(timeout)
            r.buf = b""
            out.append(r)
        mine.close()
        return out

    def send(self, data):
        self.s.sendall(data)

    def send_with_fds(self, data, fds):
        """data with descriptors attached to its first byte (SCM_RIGHTS)."""
        n = socket.send_fds(self.s, [data], fds)
        if n < len(data):
            self.s.sendall(data[n:])

    def hello(self):
        self.send(frame("hello", [1, 4242, "raw", "raw.py", "LOCAL", "rawproto"], seq=1))
        kind, _, _ = self.read()
        assert kind == KINDS["welcome"]

    def read(self, acks=False):
        """The next frame (ACK frames skipped unless acks), or None when the agent closed the
        connection."""
        while True:
            if len(self.buf) >= 16:
                n = struct.unpack(">I", self.buf[4:8])[0]
                if len(self.buf) >= 16 + n:
                    kind, seq = self.buf[3], struct.unpack(">Q", self.buf[8:16])[0]
                    body, self.buf = self.buf[16:16 + n], self.buf[16 + n:]
                    if kind == KINDS["ack"] and not acks:
                        continue
                    return kind, seq, body
            chunk = self.s.recv(65536)
            if not chunk:
                return None
            self.buf += chunk

    def close(self):
        self.s.close()


def error_fields(body):
    """Decodes an ERROR body [about_seq, code, message] as the agent encodes it."""
    assert body[0] == 0x93, body
    pos = 1
    vals = []
    for _ in range(2):
        t = body[pos]
        if t < 0x80:
            vals.append(t)
            pos += 1
        else:
            width = {0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8}[t]
            vals.append(int.from_bytes(body[pos + 1:pos + 1 + width], "big"))
            pos += 1 + width
    t = body[pos]
    if 0xa0 <= t <= 0xbf:
        n, pos = t & 0x1f, pos + 1
    elif t == 0xd9:
        n, pos = body[pos + 1], pos + 2
    else:
        n, pos = int.from_bytes(body[pos + 1:pos + 3], "big"), pos + 3
    return vals[0], vals[1], body[pos:pos + n].decode()
