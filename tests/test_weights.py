import functools
import http.server
import os
import pickle
import threading
from pathlib import Path

import pytest
import torch

import convmixer
from convmixer import ConvMixer, WeightsError, create_model
from convmixer.weights import checkpoint_filter_fn, load_weights, save_weights


def small(**kw):
    return ConvMixer(dim=16, depth=2, kernel_size=3, patch_size=2, num_classes=kw.pop("num_classes", 4), **kw)


def test_safetensors_roundtrip(tmp_path):
    a, b = small(), small()
    save_weights(a, tmp_path / "w.safetensors")
    load_weights(b, tmp_path / "w.safetensors")
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_official_release_formats(tmp_path):
    model = small()
    state = model.state_dict()
    # timm train.py checkpoint: {"state_dict": ...} with DDP prefixes, saved as .pth.tar
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}, tmp_path / "a.pth.tar")
    # the authors' nn.Sequential layout: 0..2 stem, 3..3+depth-1 blocks, head at depth + 5
    seq = {}
    for k, v in state.items():
        head, rest = k.split(".", 1)
        if head == "stem":
            seq[k[len("stem."):]] = v
        elif head == "blocks":
            i, rest2 = rest.split(".", 1)
            seq[f"{int(i) + 3}.{rest2}"] = v
        else:
            seq[f"{2 + 3 + 2}.{rest}"] = v
    torch.save(seq, tmp_path / "b.pth")
    for f in ("a.pth.tar", "b.pth"):
        fresh = small()
        load_weights(fresh, tmp_path / f)
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, state[k]), (f, k)


def test_pretrained_local_file_and_new_head(tmp_path):
    source = create_model("convmixer_256_8", dim=16, depth=2)
    save_weights(source, tmp_path / "w.safetensors")
    same = create_model("convmixer_256_8", dim=16, depth=2, pretrained=str(tmp_path / "w.safetensors"))
    assert torch.equal(same.head.weight, source.head.weight)
    finetune = create_model("convmixer_256_8", dim=16, depth=2, num_classes=3, pretrained=str(tmp_path / "w.safetensors"))
    assert torch.equal(finetune.stem[0].weight, source.stem[0].weight) and finetune.head.out_features == 3


def test_pretrained_never_leaves_a_silent_random_classifier(tmp_path):
    """A 100-class file loaded into the variant's default 10 classes kept a random head, without a word."""
    import argparse
    source = ConvMixer(16, 2, kernel_size=3, patch_size=2, num_classes=100, in_chans=1)
    save_weights(source, tmp_path / "c100.safetensors")  # records its architecture: the model is built as it
    model = create_model("convmixer_256_8", pretrained=str(tmp_path / "c100.safetensors"))
    assert model.num_classes == 100 and model.in_chans == 1 and torch.equal(model.head.weight, source.head.weight)
    torch.save(source.state_dict(), tmp_path / "c100.pth")  # bare weights: the default must match, or be asked for
    with pytest.raises(WeightsError, match="100-class classifier.*num_classes=100"):
        create_model("convmixer_256_8", dim=16, depth=2, kernel_size=3, in_chans=1, pretrained=str(tmp_path / "c100.pth"))
    assert create_model("convmixer_256_8", dim=16, depth=2, kernel_size=3, in_chans=1, num_classes=100,
                        pretrained=str(tmp_path / "c100.pth")).head.out_features == 100
    with pytest.raises(WeightsError, match="no such file"):  # a typo of fashion_mnist: not the ImageNet release
        create_model("convmixer_1536_20", pretrained="fashion-mnist")
    # timm's train.py saves its argparse.Namespace beside the weights: read, not refused as code
    torch.save({"state_dict": source.state_dict(), "args": argparse.Namespace(lr=0.1), "epoch": 3}, tmp_path / "t.pth.tar")
    fresh = ConvMixer(16, 2, kernel_size=3, patch_size=2, num_classes=100, in_chans=1)
    load_weights(fresh, tmp_path / "t.pth.tar")
    assert torch.equal(fresh.head.weight, source.head.weight)


def test_mismatch_names_tensors_and_hint(tmp_path):
    save_weights(small(num_classes=4), tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match=r"head\.weight.*num_classes"):
        load_weights(small(num_classes=7), tmp_path / "w.safetensors")
    load_weights(small(num_classes=7), tmp_path / "w.safetensors", strict=False)  # fine-tuning a new head
    with pytest.raises(WeightsError, match="missing"):
        load_weights(ConvMixer(dim=16, depth=3, kernel_size=3, patch_size=2, num_classes=4), tmp_path / "w.safetensors")


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("evil.pth", "wb") as f:
        pickle.dump({"stem.0.weight": Evil()}, f)
    with pytest.raises(WeightsError, match="refused"):
        load_weights(small(), "evil.pth")
    assert not Path("pwned").exists()


def test_truncated_and_garbage_files(tmp_path):
    save_weights(small(), tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_weights(small(), tmp_path / "t.safetensors")
    torch.save(small().state_dict(), tmp_path / "w.pth")
    (tmp_path / "t.pth").write_bytes((tmp_path / "w.pth").read_bytes()[:300])
    with pytest.raises(WeightsError, match="truncated"):
        load_weights(small(), tmp_path / "t.pth")
    with pytest.raises(WeightsError, match="not found"):
        load_weights(small(), tmp_path / "nope.pth")


def test_pretrained_download_from_a_server(tmp_path, monkeypatch):
    """The real download path (into TORCH_HOME's hub cache), served from a local HTTP server."""
    served = tmp_path / "served"
    served.mkdir()
    reference = create_model("convmixer_256_8")
    torch.save({"state_dict": reference.state_dict()}, served / "release.pth.tar")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        variant = convmixer.VARIANTS["convmixer_256_8"]
        import dataclasses
        monkeypatch.setitem(convmixer.VARIANTS, "convmixer_256_8",
                            dataclasses.replace(variant, url=f"http://127.0.0.1:{server.server_port}/release.pth.tar"))
        model = create_model("convmixer_256_8", pretrained=True)
        assert torch.equal(model.head.weight, reference.head.weight)
        assert (Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / "release.pth.tar").is_file()
        # every command accepts a released variant by name, with the variant's own preprocessing
        from convmixer.run import load_model
        named, info = load_model("convmixer_256_8")
        assert torch.equal(named.head.weight, reference.head.weight)
        assert (info.img_size, info.crop_pct, info.classes[:2]) == (32, 1.0, ["0", "1"])
        assert info.mean == list(convmixer.VARIANTS["convmixer_256_8"].mean)
        # a download cut short stayed in the cache and failed every later call: removed, then fetched afresh
        cached = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / "release.pth.tar"
        cached.write_bytes(cached.read_bytes()[:1000])
        with pytest.raises(WeightsError, match="damaged download was removed"):
            create_model("convmixer_256_8", pretrained=True)
        assert not cached.exists()
        assert torch.equal(create_model("convmixer_256_8", pretrained=True).head.weight, reference.head.weight)
    finally:
        server.shutdown()


class _BadServer(http.server.BaseHTTPRequestHandler):
    """/stall: headers, then silence; /short: 100 of 1000 announced bytes; /huge: 10 GB announced;
    /endless: no length, then more bytes than any release file; /empty: length 0."""
    def do_GET(self):
        if self.path == "/stall":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.flush()
            threading.Event().wait(10)
            return
        self.send_response(200)
        length = {"/short": "1000", "/huge": str(10 ** 10), "/empty": "0"}.get(self.path)
        if length:
            self.send_header("Content-Length", length)
        self.end_headers()
        self.wfile.write(b"x" * {"/endless": 3000, "/empty": 0}.get(self.path, 100))

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("path, reason", [("stall", "timed out"), ("short", "closed after 100 of 1000 bytes"),
                                          ("huge", "announces 10000000000 bytes"), ("endless", "sent more than 2000"),
                                          ("empty", "sent an empty file")])
def test_a_download_that_stalls_stops_short_or_runs_on_is_one_line(path, reason, monkeypatch):
    """A stalled connection hung for ever (no timeout); a server's length was never checked or bounded."""
    from convmixer import weights
    monkeypatch.setattr(weights, "DOWNLOAD_STALL_SECONDS", 1)
    monkeypatch.setattr(weights, "DOWNLOAD_MAX_BYTES", 2000)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BadServer)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(WeightsError) as info:
            weights.download(f"http://127.0.0.1:{server.server_port}/{path}", f"{path}.pth.tar")
    finally:
        server.shutdown()
    message = str(info.value)
    assert message.startswith("could not download") and reason in message and "\n" not in message
    assert not list((Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints").glob(f"*{path}*"))  # nothing kept


def test_pretrained_offline_is_one_clear_line(monkeypatch):
    import dataclasses
    variant = convmixer.VARIANTS["convmixer_1536_20"]
    monkeypatch.setitem(convmixer.VARIANTS, "convmixer_1536_20",
                        dataclasses.replace(variant, url="http://127.0.0.1:9/convmixer_1536_20_ks9_p7.pth.tar"))
    with pytest.raises(WeightsError) as info:
        create_model("convmixer_1536_20", pretrained=True)
    message = str(info.value)
    assert "could not download" in message and "pretrained='path/to/" in message and "\n" not in message


def test_release_urls_are_the_official_ones():
    assert convmixer.VARIANTS["convmixer_1536_20"].url == \
        "https://github.com/tmp-iclr/convmixer/releases/download/v1.0/convmixer_1536_20_ks9_p7.pth.tar"
    assert checkpoint_filter_fn({"model": {"_orig_mod.head.bias": 1}}) == {"head.bias": 1}
