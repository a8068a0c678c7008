"""`--codec auto`: which codec each direction gets, as literal cases."""

from comfy_mesh.codec.negotiate import choose, format_mismatches, is_loopback

ALL = ["cpu", "gpu", "raw"]


def test_loopback_is_recognised():
    assert is_loopback("tcp://127.0.0.1:5599") and is_loopback("tcp://localhost:1") and is_loopback("tcp://[::1]:9")
    assert not is_loopback("tcp://192.168.1.20:5599") and not is_loopback("tcp://gpu-box.local:5599")


def test_raw_on_loopback_and_fast_links():
    c = choose("tcp://127.0.0.1:5599", local_encoders=ALL, local_decoders=ALL, local_cuda=True,
               peer_encoders=ALL, peer_decoders=ALL, peer_cuda=True)
    assert (c.carry, c.reply) == ("raw", "raw") and "loopback" in c.reason
    c = choose("tcp://10.0.0.2:5599", local_encoders=ALL, local_decoders=ALL, local_cuda=True,
               peer_encoders=ALL, peer_decoders=ALL, peer_cuda=True, fast_link=True)
    assert (c.carry, c.reply) == ("raw", "raw") and "fast" in c.reason


def test_nvenc_where_the_sender_encodes_and_the_receiver_decodes():
    # A 4090 (NVENC) sends to an H100 (NVDEC only); the H100 answers with the gpu codec.
    c = choose("tcp://10.0.0.2:5599", local_encoders=ALL + ["nvenc"], local_decoders=ALL + ["nvenc"],
               local_cuda=True, peer_encoders=ALL, peer_decoders=ALL + ["nvenc"], peer_cuda=True)
    assert (c.carry, c.reply) == ("nvenc", "gpu")
    assert "NVENC" in c.reason and "no NVENC" in c.reason


def test_gpu_codec_needs_cuda_on_the_sender_else_cpu():
    c = choose("tcp://10.0.0.2:5599", local_encoders=ALL, local_decoders=ALL, local_cuda=False,
               peer_encoders=ALL, peer_decoders=ALL, peer_cuda=True)
    assert (c.carry, c.reply) == ("cpu", "gpu")
    c = choose("tcp://10.0.0.2:5599", local_encoders=["raw"], local_decoders=["raw"], local_cuda=False,
               peer_encoders=ALL, peer_decoders=ALL, peer_cuda=False)
    assert (c.carry, c.reply) == ("raw", "raw") and "no compressing codec" in c.reason


def test_a_codec_whose_message_format_differs_between_the_ends_is_left_out_and_said_why():
    from comfy_mesh.codec import formats

    ours = formats()
    older = {**ours, "gpu": ours["gpu"] - 1}
    mismatched = format_mismatches(older)
    assert list(mismatched) == ["gpu"] and f"format {ours['gpu']}, the peer's {ours['gpu'] - 1}" in mismatched["gpu"]
    assert format_mismatches(ours) == {} and format_mismatches(None) == {}  # an older peer that does not say
    assert format_mismatches({"gpu": ours["gpu"]}) == {}  # a codec the peer does not list is not a mismatch
    c = choose("tcp://10.0.0.2:5599", local_encoders=ALL, local_decoders=ALL, local_cuda=True,
               peer_encoders=ALL, peer_decoders=ALL, peer_cuda=True, unusable=mismatched)
    assert (c.carry, c.reply) == ("cpu", "cpu") and "gpu not used (this end's gpu messages are format" in c.reason
    assert c.carry_reason.startswith("carry cpu: ") and "gpu not used" in c.carry_reason
    assert "reply" not in c.carry_reason
    c = choose("tcp://10.0.0.2:5599", local_encoders=ALL, local_decoders=ALL, local_cuda=True,
               peer_encoders=ALL, peer_decoders=ALL, peer_cuda=True, unusable={"raw": "?", "cpu": "?", "gpu": "?"})
    assert (c.carry, c.reply) == ("raw", "raw")  # raw is what is left, never left out


def test_this_machine_decodes_nvenc_messages_it_cannot_encode():
    from comfy_mesh.codec.negotiate import local_capabilities

    encoders, decoders = local_capabilities()
    assert {"raw", "cpu", "gpu"} <= set(encoders) <= set(decoders)
    assert "nvenc" not in encoders  # no NVENC on a CPU machine: found by trying, not assumed
    assert "nvenc" in decoders  # its HEVC decodes in software (FFmpeg) here
