"""Split generation through a real daemon over real ZeroMQ sockets on loopback.

The headline: a split run equals the all-local run (exactly with `raw`). Then the
daemon's robustness: garbage, truncation, vanished clients, stale epochs, oversize
messages and a full GPU each get a clear ERROR reply, and the daemon keeps serving.
"""

import json
import os
import time

import pytest
import torch
import zmq

from comfy_mesh import codec as codecs
from comfy_mesh.daemon.client import DaemonClient, PeerError, PeerRefused, PeerTimeout
from comfy_mesh.daemon.protocol import ErrorCode, ForwardRequest, Message, PROTOCOL_VERSION, from_frames
from comfy_mesh.daemon.remote_stage import RemoteStage
from comfy_mesh.splitter.context_hash import ids_hash
from comfy_mesh.splitter.model_file import open_model
from comfy_mesh.splitter.plan import BlockRange, tail_split
from comfy_mesh.splitter.sampling import euler_sample, flow_sigmas
from comfy_mesh.splitter.split_runner import SplitRunner

from daemon_helpers import inputs, running_daemon


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    m = open_model(tiny_checkpoint)
    yield m
    m.close()


def _sample(fn, x, steps=3):
    return euler_sample(lambda z, s, i: fn(z, x["txt"], s, x["img_ids"], x["txt_ids"], x["guidance"]),
                        x["img"], flow_sigmas(steps, shift=3.0))


def _local_reference(model, x, steps=3):
    whole = model.stage(BlockRange(0, model.config.n_blocks), first=True, last=True)
    return _sample(whole, x, steps)


def _runner(model, server, n_remote, codec="raw", **codec_settings):
    client = DaemonClient(server.endpoint, timeout_s=30)
    remote = RemoteStage(client, codecs.get(codec, **codec_settings), measure_error=True)
    info = remote.connect(fingerprint=model.fingerprint)
    plan = tail_split(model.config.n_blocks, n_remote, remote=info.node, epoch=info.epoch + 1)
    front = model.stage(plan.local, first=True, last=plan.is_last("local"))
    return SplitRunner(front, plan, {info.node: remote}), client


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_a_daemon_bound_by_host_name_gives_an_address_clients_can_use(tiny_checkpoint):
    # --host localhost (or an interface name, as ZeroMQ takes it) is not a connect address
    # everywhere; the endpoint the daemon reports (logs, the ready line) is its IPv4 form.
    with running_daemon(tiny_checkpoint, bind_host="localhost") as server:
        assert server.endpoint == f"tcp://127.0.0.1:{server.port}"
        with DaemonClient(server.endpoint, timeout_s=10) as client:
            assert client.hello().node == "node-b"


@pytest.mark.parametrize("n_remote", [1, 3, 5])
def test_split_equals_local_with_raw_codec(model, tiny_checkpoint, n_remote):
    x = inputs(model.config)
    expected = _local_reference(model, x)
    with running_daemon(tiny_checkpoint, blocks=2) as server:
        runner, client = _runner(model, server, n_remote)
        got = _sample(runner, x)
        client.close()
    assert _rel(got, expected) <= 1e-6
    assert all(len(s.hops) == 1 and s.n_blocks_remote == n_remote for s in runner.stats)


def test_cpu_codec_stays_within_its_stated_error(model, tiny_checkpoint):
    x = inputs(model.config, size=12)
    expected = _local_reference(model, x)
    with running_daemon(tiny_checkpoint, blocks=3) as server:
        runner, client = _runner(model, server, 3, codec="cpu")
        # Check each hop against the bound the encoder states for that very message.
        cpu = runner.remotes[runner.plan.remotes[0].node].codec
        hidden = torch.randn(1, 8 + 144, model.config.hidden_size)
        msg = cpu.encode(hidden)
        assert _rel(codecs.decode(msg), hidden) <= msg.rel_err_bound
        got = _sample(runner, x)
        client.close()
    hop_errs = [h.rel_err for s in runner.stats for h in s.hops]
    assert 0 < max(hop_errs) <= 0.05
    assert _rel(got, expected) < 0.1  # three lossy hops: close, not equal
    assert sum(h.bytes_out for s in runner.stats for h in s.hops) < sum(h.raw_bytes for s in runner.stats for h in s.hops)


def test_reconfigure_between_steps_keeps_parity(model, tiny_checkpoint):
    x = inputs(model.config)
    steps = 6
    expected = _local_reference(model, x, steps)
    with running_daemon(tiny_checkpoint, blocks=1) as server:
        runner, client = _runner(model, server, 1)
        n = model.config.n_blocks
        schedule = {0: 4, 1: 0, 2: 5, 3: 2, 4: 3}  # step -> n_blocks_remote applied before that step

        def step_fn(z, s, i):
            if i in schedule:
                runner.request_plan(tail_split(n, schedule[i], remote=runner.plan.entries[-1].node
                                               if len(runner.plan.entries) > 1 else "node-b",
                                               epoch=runner.plan.epoch + 1))
            return runner(z, x["txt"], s, x["img_ids"], x["txt_ids"], x["guidance"])

        got = euler_sample(step_fn, x["img"], flow_sigmas(steps, shift=3.0))
        status = client.status()
        client.close()
    assert [s.n_blocks_remote for s in runner.stats] == [4, 0, 5, 2, 3, 3]
    assert _rel(got, expected) <= 1e-6
    assert status.hosted == [n - 3, n] and status.epoch == runner.plan.epoch


def _moved_by_the_panel_at_step_two(model, tiny_checkpoint, start: int, to: int):
    """A 4-step generation starting with `start` remote blocks, whose split another client
    (the panel) moves to `to` before step 2. -> (runner, output, all-local output)."""
    x = inputs(model.config)
    steps = 4
    expected = _local_reference(model, x, steps)
    with running_daemon(tiny_checkpoint, blocks=2) as server:
        runner, client = _runner(model, server, start)
        panel = DaemonClient(server.endpoint, timeout_s=30, name="panel")
        node = next(iter(runner.remotes))

        def step_fn(z, s, i):
            if i == 2:
                panel.reconfigure(tail_split(model.config.n_blocks, to, remote=node, epoch=runner.plan.epoch + 1))
            return runner(z, x["txt"], s, x["img_ids"], x["txt_ids"], x["guidance"])

        got = euler_sample(step_fn, x["img"], flow_sigmas(steps, shift=3.0))
        panel.close()
        client.close()
    return runner, got, expected


def test_plan_moved_by_another_client_is_adopted_at_the_next_step(model, tiny_checkpoint):
    """The panel's path: RECONFIGURE goes to the daemon; the generation follows at its next step."""
    runner, got, expected = _moved_by_the_panel_at_step_two(model, tiny_checkpoint, start=2, to=4)
    assert [s.n_blocks_remote for s in runner.stats] == [2, 2, 4, 4]
    assert len(runner.local.blocks) == 1
    assert _rel(got, expected) <= 1e-6


def _forward_body(model, epoch, x):
    return ForwardRequest(epoch=epoch, session="t", step=0, timestep=[0.5], ids_hash=ids_hash(x["txt_ids"], x["img_ids"]))


def _ids(x):
    raw = codecs.get("raw")
    return {"txt_ids": raw.encode(x["txt_ids"]), "img_ids": raw.encode(x["img_ids"])}


def test_stale_epoch_is_refused_with_the_current_plan(model, tiny_checkpoint):
    x = inputs(model.config)
    with running_daemon(tiny_checkpoint, blocks=2) as server, DaemonClient(server.endpoint, timeout_s=10) as client:
        hello = client.hello()
        plan = tail_split(model.config.n_blocks, 3, remote=hello.node, epoch=5)
        client.reconfigure(plan)
        hidden = torch.randn(1, 8 + 36, model.config.hidden_size)
        with pytest.raises(PeerRefused) as err:
            client.request(_forward_body(model, 4, x), {"carry": codecs.get("raw").encode(hidden)} | _ids(x))
        assert err.value.code == ErrorCode.STALE_EPOCH and err.value.plan == plan.to_dict()
        with pytest.raises(PeerRefused) as err:  # an older plan cannot be installed either
            client.reconfigure(tail_split(model.config.n_blocks, 1, remote=hello.node, epoch=4))
        assert err.value.code == ErrorCode.STALE_EPOCH
        reply = client.request(_forward_body(model, 5, x), {"carry": codecs.get("raw").encode(hidden)} | _ids(x))
        assert reply.body.kind == "output" and reply.tensors["result"].header["shape"] == [1, 36, 128]


def _raw_exchange(endpoint, frames, timeout_ms=5000):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(timeout_ms), "the daemon did not answer"
        return from_frames(sock.recv_multipart())
    finally:
        sock.close()


def _header(**fields):
    base = {"proto": PROTOCOL_VERSION, "type": "HELLO", "id": 3, "body": {"client": "x"}, "tensors": []}
    base.update(fields)
    return json.dumps(base).encode()


GARBAGE = {
    "random bytes": ([os.urandom(64)], ErrorCode.MALFORMED),
    "json but not ours": ([b'{"hello": 1}'], ErrorCode.MALFORMED),
    "json array": ([b"[1, 2]"], ErrorCode.MALFORMED),
    "wrong protocol": ([_header(proto=99)], ErrorCode.VERSION),
    "unknown type": ([_header(type="EXPLODE")], ErrorCode.MALFORMED),
    "body of wrong type": ([_header(body={"client": 5})], ErrorCode.MALFORMED),
    "missing field": ([_header(type="FORWARD", body={"epoch": 0})], ErrorCode.MALFORMED),
    "truncated tensors": ([_header(type="STATUS", body={}, tensors=[{"name": "a", "enc": {}, "nbuf": 2}]), b"x"],
                          ErrorCode.MALFORMED),
    "extra frames": ([_header(type="STATUS", body={}), b"x", b"y"], ErrorCode.MALFORMED),
    "bad tensor entry": ([_header(type="STATUS", body={}, tensors=[{"name": 1}])], ErrorCode.MALFORMED),
}


def test_garbage_gets_error_replies_and_the_daemon_keeps_serving(tiny_checkpoint):
    with running_daemon(tiny_checkpoint, blocks=2) as server:
        for name, (frames, code) in GARBAGE.items():
            reply = _raw_exchange(server.endpoint, frames)
            assert reply.type == "ERROR" and reply.body.code == code, name
            assert reply.body.message, name
        with DaemonClient(server.endpoint, timeout_s=10) as client:
            status = client.status()
            assert status.errors == len(GARBAGE) and status.state == "serving"


def test_corrupt_codec_payload_is_a_bad_request(model, tiny_checkpoint):
    x = inputs(model.config)
    with running_daemon(tiny_checkpoint, blocks=2) as server, DaemonClient(server.endpoint, timeout_s=10) as client:
        epoch = client.hello().epoch
        hidden = torch.randn(1, 8 + 36, model.config.hidden_size)
        good = codecs.get("cpu").encode(hidden)
        bad = type(good)(good.header, [b"\x00" * 7 for _ in good.buffers])
        with pytest.raises(PeerRefused) as err:
            client.request(_forward_body(model, epoch, x), {"carry": bad} | _ids(x))
        assert err.value.code == ErrorCode.BAD_REQUEST
        wrong_shape = codecs.get("raw").encode(torch.randn(1, 3, 7))
        with pytest.raises(PeerRefused, match="does not fit this model") as err:
            client.request(_forward_body(model, epoch, x), {"carry": wrong_shape} | _ids(x))
        reply = client.request(_forward_body(model, epoch, x), {"carry": good} | _ids(x))
        assert reply.body.kind == "output"


def test_oversized_message_is_refused(model, tiny_checkpoint):
    x = inputs(model.config)
    with running_daemon(tiny_checkpoint, blocks=2, max_message_bytes=10_000) as server, \
            DaemonClient(server.endpoint, timeout_s=10) as client:
        epoch = client.hello().epoch
        hidden = torch.randn(1, 8 + 36, model.config.hidden_size)  # 45 KB raw
        with pytest.raises(PeerRefused, match="exceeds this daemon's limit") as err:
            client.request(_forward_body(model, epoch, x), {"carry": codecs.get("raw").encode(hidden)} | _ids(x))
        assert err.value.code == ErrorCode.TOO_LARGE
        assert client.status().state == "serving"


def test_client_vanishing_mid_request_leaves_the_daemon_serving(model, tiny_checkpoint):
    x = inputs(model.config)
    with running_daemon(tiny_checkpoint, blocks=2) as server:
        with DaemonClient(server.endpoint) as first:
            epoch = first.hello().epoch
        ctx = zmq.Context.instance()
        for _ in range(3):  # send work and disappear before the reply
            quitter = ctx.socket(zmq.DEALER)
            quitter.connect(server.endpoint)
            hidden = torch.randn(1, 8 + 36, model.config.hidden_size)
            msg = Message(_forward_body(model, epoch, x), id=1, tensors={"carry": codecs.get("raw").encode(hidden)} | _ids(x))
            quitter.send_multipart(msg.to_frames())
            quitter.close(linger=2000)  # the request leaves; nobody stays for the answer
        with DaemonClient(server.endpoint, timeout_s=10) as client:
            deadline = time.monotonic() + 10
            while client.status().forward_steps < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.status().forward_steps == 3
            assert client.hello().hosted == [3, 5]


def test_fingerprint_mismatch_names_the_file(tiny_checkpoint):
    with running_daemon(tiny_checkpoint, blocks=2) as server, DaemonClient(server.endpoint, timeout_s=10) as client:
        with pytest.raises(PeerRefused, match="tiny-flux2.safetensors") as err:
            client.hello(fingerprint="0" * 64)
        assert err.value.code == ErrorCode.FINGERPRINT


def test_lost_context_is_sent_again(model, tiny_checkpoint):
    x = inputs(model.config)
    with running_daemon(tiny_checkpoint, blocks=2) as server:
        runner, client = _runner(model, server, 2)
        first = runner(x["img"], x["txt"], torch.tensor([0.5]), x["img_ids"], x["txt_ids"])
        server.host._contexts.clear()  # as after a daemon restart
        again = runner(x["img"], x["txt"], torch.tensor([0.5]), x["img_ids"], x["txt_ids"])
        client.close()
    assert torch.equal(first, again)
    # The second step sent the carry twice and the ids again: refused once, then resent.
    assert runner.stats[1].hops[0].bytes_out > runner.stats[0].hops[0].bytes_out
    assert server.host.counters.errors == 1  # exactly one MISSING_CONTEXT on the way


def test_full_gpu_gets_an_error_and_the_daemon_recovers(model, tiny_checkpoint, monkeypatch):
    x = inputs(model.config)
    with running_daemon(tiny_checkpoint, blocks=2) as server:
        runner, client = _runner(model, server, 2)
        stage = server.host.stage

        def out_of_memory(*a, **k):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        monkeypatch.setattr(stage, "run_blocks", out_of_memory)
        with pytest.raises(PeerRefused, match="lower n_blocks_remote") as err:
            runner(x["img"], x["txt"], torch.tensor([0.5]), x["img_ids"], x["txt_ids"])
        assert err.value.code == ErrorCode.OOM
        monkeypatch.undo()
        out = runner(x["img"], x["txt"], torch.tensor([0.5]), x["img_ids"], x["txt_ids"])
        client.close()
    assert torch.isfinite(out).all()


def test_status_reports_traffic_and_memory(model, tiny_checkpoint):
    x = inputs(model.config)
    with running_daemon(tiny_checkpoint, blocks=2) as server:
        runner, client = _runner(model, server, 2)
        _sample(runner, x, steps=2)
        status = client.status()
        client.close()
    assert status.forward_steps == 2 and status.hosted == [3, 5] and status.last
    assert status.bytes_in > 2 * 44 * 256 * 4 and status.bytes_out > 2 * 36 * 128 * 4
    assert status.memory["kind"] == "process" and status.memory["weights"] > 0
    assert status.step_s["mean"] > 0


def test_unreachable_daemon_times_out_with_advice():
    ctx = zmq.Context.instance()
    probe = ctx.socket(zmq.ROUTER)
    port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(0)  # nothing listens there now
    with DaemonClient(f"tcp://127.0.0.1:{port}", timeout_s=0.5) as client:
        with pytest.raises(PeerTimeout, match="is the daemon running"):
            client.status()


def test_gpu_codec_codes_deltas_across_steps_and_survives_a_lost_stream(model, tiny_checkpoint):
    x = inputs(model.config, size=16, n_txt=16)
    steps = 5
    expected = _local_reference(model, x, steps)
    with running_daemon(tiny_checkpoint, blocks=3) as server:
        runner, client = _runner(model, server, 3, codec="gpu", rel_err=0.03)
        remote = runner.remotes[runner.plan.remotes[0].node]

        def step_fn(z, s, i):
            if i == 3:
                server.host._streams.clear()  # the daemon forgets our codec stream (as after a restart)
            return runner(z, x["txt"], s, x["img_ids"], x["txt_ids"], x["guidance"])

        got = euler_sample(step_fn, x["img"], flow_sigmas(steps, shift=3.0))
        client.close()
    hops = [s.hops[0] for s in runner.stats]
    assert all(h.rel_err <= 0.03 * 1.001 for h in hops if h.rel_err == h.rel_err)
    assert hops[1].bytes_out < hops[0].bytes_out  # a delta after the key message
    assert server.host.counters.errors == 1  # one CODEC_STATE refusal, then a key message
    assert _rel(got, expected) < 0.05
    assert remote.choice == {"codec": "gpu", "reason": "chosen by the user"}


def test_auto_codec_is_raw_on_loopback_and_status_says_why(model, tiny_checkpoint):
    x = inputs(model.config)
    with running_daemon(tiny_checkpoint, blocks=2) as server:
        client = DaemonClient(server.endpoint, timeout_s=30)
        remote = RemoteStage(client, "auto")
        info = remote.connect(fingerprint=model.fingerprint)
        assert remote.codec.name == "raw" and "loopback" in remote.choice["reason"]
        plan = tail_split(model.config.n_blocks, 2, remote=info.node, epoch=info.epoch)
        runner = SplitRunner(model.stage(plan.local, first=True, last=False), plan, {info.node: remote})
        runner(x["img"], x["txt"], torch.tensor([0.5]), x["img_ids"], x["txt_ids"])
        status = client.status()
        client.close()
    assert status.codec["codec"] == "raw" and "loopback" in status.codec["reason"]


def test_a_codec_whose_format_differs_from_the_daemons_is_refused_at_connect(model, tiny_checkpoint, monkeypatch):
    """HELLO says which message format each codec writes; an older or newer daemon whose
    gpu format differs is refused when the client connects, with both numbers, not at
    the first message (where its decoder would refuse the header's version)."""
    ours = codecs.formats()
    with running_daemon(tiny_checkpoint, blocks=2) as server:
        client = DaemonClient(server.endpoint, timeout_s=30)
        assert client.hello().formats == ours and ours["gpu"] == codecs.get("gpu").format_version
        monkeypatch.setattr(codecs, "formats", lambda: {**ours, "gpu": ours["gpu"] - 1})  # what the daemon says
        with pytest.raises(codecs.CodecError, match=f"format {ours['gpu']}, the peer's {ours['gpu'] - 1}"):
            RemoteStage(client, codecs.get("gpu")).connect(fingerprint=model.fingerprint)
        remote = RemoteStage(client, codecs.get("cpu"))  # the codecs whose formats agree still work
        info = remote.connect(fingerprint=model.fingerprint)
        plan = tail_split(model.config.n_blocks, 2, remote=info.node, epoch=info.epoch)
        runner = SplitRunner(model.stage(plan.local, first=True, last=False), plan, {info.node: remote})
        x = inputs(model.config)
        out = runner(x["img"], x["txt"], torch.tensor([0.5]), x["img_ids"], x["txt_ids"])
        client.close()
    assert out.isfinite().all()


def test_all_local_steps_notice_a_daemon_given_blocks_again(model, tiny_checkpoint):
    """At n_blocks_remote = 0 no FORWARD goes out; the runner asks for the plan instead."""
    runner, got, expected = _moved_by_the_panel_at_step_two(model, tiny_checkpoint, start=0, to=3)
    assert [s.n_blocks_remote for s in runner.stats] == [0, 0, 3, 3]
    assert _rel(got, expected) <= 1e-6


def test_a_move_that_runs_out_of_memory_keeps_the_old_plan(model, tiny_checkpoint, monkeypatch):
    x = inputs(model.config)
    with running_daemon(tiny_checkpoint, blocks=2) as server:
        runner, client = _runner(model, server, 2)
        before = runner(x["img"], x["txt"], torch.tensor([0.5]), x["img_ids"], x["txt_ids"])

        def full_gpu(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

        monkeypatch.setattr(server.host.model.checkpoint, "load", full_gpu)
        node = runner.plan.remotes[0].node
        with pytest.raises(PeerRefused) as err:
            client.reconfigure(tail_split(model.config.n_blocks, 5, remote=node, epoch=runner.plan.epoch + 1))
        assert err.value.code == ErrorCode.OOM
        monkeypatch.undo()
        status = client.status()
        assert status.hosted == [3, 5] and status.state == "serving" and status.epoch == runner.plan.epoch
        again = runner(x["img"], x["txt"], torch.tensor([0.5]), x["img_ids"], x["txt_ids"])
        client.close()
    assert torch.equal(before, again)


def test_a_chain_of_two_daemons_equals_local(model, tiny_checkpoint):
    """local [0, 1) -> B [1, 3) -> C [3, 5): the middle daemon returns a hidden state."""
    from comfy_mesh.splitter.plan import chain_split

    x = inputs(model.config)
    expected = _local_reference(model, x)
    with running_daemon(tiny_checkpoint, blocks=0, node_id="node-b") as b, \
            running_daemon(tiny_checkpoint, blocks=0, node_id="node-c") as c:
        remotes = {}
        for server in (b, c):
            remote = RemoteStage(DaemonClient(server.endpoint, timeout_s=30), codecs.get("raw"))
            remotes[remote.connect(fingerprint=model.fingerprint).node] = remote
        plan = chain_split(model.config.n_blocks, [("node-b", 2), ("node-c", 2)], epoch=1)
        runner = SplitRunner(model.stage(plan.local, first=True, last=False), plan, remotes)
        got = _sample(runner, x)
        assert b.host.hosted == BlockRange(1, 3) and not b.host.is_last
        assert c.host.hosted == BlockRange(3, 5) and c.host.is_last
        for remote in remotes.values():
            remote.client.close()
    assert _rel(got, expected) <= 1e-6
    assert all([h.node for h in s.hops] == ["node-b", "node-c"] for s in runner.stats)


def test_a_bad_address_is_a_clear_error():
    with pytest.raises(PeerError, match="give the daemon as HOST:PORT"):
        DaemonClient("tcp://bad host:5599")
