"""Raw-socket checks of the agent's handling of input the shim never sends: each gets a clear
error frame, and a malformed frame closes only its own connection."""
from harness import driver_runs, run_driver
from rawproto import KINDS, Raw, error_fields, frame

TS0 = 1_700_000_000_000


def test_bad_run_id_gets_an_error_frame(agent):
    r = Raw(agent.socket)
    r.hello()
    r.send(frame("metrics", ["Z" * 32, ["m", 1.0, TS0, 0]], seq=7))
    kind, _, body = r.read()
    assert kind == KINDS["error"]
    seq, code, msg = error_fields(body)
    assert (seq, code) == (7, 5)
    assert "ZZZZ" in msg
    r.send(frame("flush", [], seq=8))
    kind, _, _ = r.read()
    assert kind == KINDS["flushed"]
    r.close()
    assert agent.stats()["rejected_bad_run_id"] == 1


def test_malformed_frames_close_only_their_connection(pg, db, agent):
    cases = [
        (b"XX\x01\x06" + b"\x00" * 12, "bad frame magic"),
        (frame("metrics", [], version=9), "unsupported protocol version"),
        (b"TK\x01\x63" + b"\x00" * 12, "unknown message kind"),
        (b"TK\x01\x06\x40\x00\x00\x00" + b"\x00" * 8, "frame body exceeds the size limit"),
        (frame("metrics", b"\x92\xa1x\xdd\xff\xff\xff\xff"), "malformed or truncated msgpack"),
        (frame("metrics", ["a" * 32, "not a list"]), "wrong count or type"),
        (frame("welcome", [1, "x", 1, 1]), "sent by the agent"),
    ]
    good = run_driver(agent.socket, [["run", "r", "proto-exp", "p", "now"]])[0]
    run_id = driver_runs(good)["r"]
    for data, expected in cases:
        r = Raw(agent.socket)
        r.hello()
        r.send(data)
        kind, _, body = r.read()
        assert kind == KINDS["error"]
        _, code, msg = error_fields(body)
        assert code == 30 and expected in msg, (expected, msg)
        assert r.read() is None  # closed by the agent
        r.close()
    # Frames before hello are refused too.
    r = Raw(agent.socket)
    r.send(frame("metrics", [run_id, ["m", 1.0, TS0, 0]]))
    kind, _, body = r.read()
    assert "the first frame must be hello" in error_fields(body)[2]
    r.close()
    # A well-behaved client is unaffected.
    out, _ = run_driver(agent.socket, [["metric", run_id, "m", "1", "0", str(TS0)], ["flush", "30000"]])
    assert ["flush", "0"] in out
    assert pg.query(db, "SELECT count(*) FROM metrics WHERE run_uuid = %s", (run_id,)) == [(1,)]
    assert agent.stats()["rejected_protocol"] == len(cases) + 1


def test_frame_split_at_every_byte(pg, db, agent):
    """The agent reassembles frames whatever the segmentation."""
    good = run_driver(agent.socket, [["run", "r", "split-exp", "s", "now"]])[0]
    run_id = driver_runs(good)["r"]
    r = Raw(agent.socket)
    r.hello()
    data = b"".join(frame("metrics", [run_id, [f"k{i}", float(i), TS0, i]], seq=10 + i)
                    for i in range(20)) + frame("flush", [], seq=99)
    for b in data:
        r.send(bytes([b]))
    kind, seq, _ = r.read()
    assert (kind, seq) == (KINDS["flushed"], 0)
    r.close()
    assert pg.query(db, "SELECT count(*) FROM metrics WHERE run_uuid = %s", (run_id,)) == [(20,)]
