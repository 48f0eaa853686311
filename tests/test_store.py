"""The expert-aligned store (convert, verify, StoreSource) and the O_DIRECT reader under it."""

import ctypes
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import assert_like_reference

import moepager
from moepager.cli import main
from moepager.errors import CorruptFile
from moepager.sources.checkpoint import Checkpoint
from moepager.store import convert as convert_mod
from moepager.store.convert import convert
from moepager.store.format import DENSE_FILE, EXPERTS_FILE, MANIFEST, read_manifest
from moepager.store.open_model import open_source
from moepager.store.reading import StoreSource
from moepager.store.verify import verify
from moepager.system.direct_reader import ALIGN, DirectReader, aligned_buffer
from moepager.system.native_aio import open_context

PARITY_FAMILIES = ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"]


@pytest.fixture(scope="module")
def stores(tiny, tmp_path_factory):
    """stores(family) -> (store path, transformers model), converted once per module."""
    made = {}

    def get(family):
        if family not in made:
            src, ref = tiny(family)
            made[family] = (convert(src, tmp_path_factory.mktemp("stores") / family, progress=False), ref)
        return made[family]

    return get


@pytest.fixture
def store_copy(stores, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(stores("mixtral")[0], path)
    return path


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("family", PARITY_FAMILIES)
def test_store_matches_transformers(stores, family):
    path, ref = stores(family)
    engine = moepager.load(path)
    assert isinstance(open_source(path), StoreSource)
    assert_like_reference(engine, ref, new_tokens=32)


def test_every_expert_is_aligned_and_one_read(stores):
    path, _ = stores("deepseek_v3")
    manifest = read_manifest(path)
    assert manifest.experts and all(x.offset % ALIGN == 0 for x in manifest.experts.values())
    src = StoreSource(path)
    for key in src.expert_keys():
        src.read_expert(*key)
    stats = src.reader.stats()
    assert stats["reads"] == len(manifest.experts)
    assert stats["bytes_read"] == sum(src.expert_nbytes(*k) for k in src.expert_keys())


def test_read_expert_fills_out_in_place_from_threads(tiny, stores):
    src_path, _ = tiny("gpt_oss")
    for source in (Checkpoint(src_path), StoreSource(stores("gpt_oss")[0])):
        keys = source.expert_keys()
        want = {k: source.read_expert(*k) for k in keys}

        def fill(key, source=source, want=want):
            out = {n: torch.empty_like(t) for n, t in want[key].items()}
            ptrs = {n: t.data_ptr() for n, t in out.items()}
            got = source.read_expert(*key, out=out)
            assert got is out and all(t.data_ptr() == ptrs[n] for n, t in out.items())
            return key, out

        with ThreadPoolExecutor(4) as pool:
            for key, out in pool.map(fill, keys * 8):
                assert all(torch.equal(out[n], want[key][n]) for n in want[key])


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_streamed_reads_into_out_match_whole_reads(tiny, stores, family):
    """With `out` of the stored dtype, experts are copied in small pieces; the bytes must not change."""
    sources = [Checkpoint(tiny(family)[0]), StoreSource(stores(family)[0])]
    small = DirectReader(chunk_bytes=ALIGN)  # many pieces per tensor, boundaries inside tensors
    streamed = [Checkpoint(tiny(family)[0], reader=small), StoreSource(stores(family)[0], reader=small)]
    for whole, piecewise in zip(sources, streamed):
        for key in whole.expert_keys():
            want = whole.read_expert(*key)
            out = {n: torch.full_like(t, float("nan")) for n, t in want.items()}
            piecewise.read_expert(*key, out=out)
            assert all(torch.equal(out[n], want[n]) for n in want)
    assert small.stats()["reads"] > 2 * len(sources[1].expert_keys())


def test_streamed_read_checks_the_checksum(store_copy):
    entry = read_manifest(store_copy).experts[(0, 3)]
    _flip(store_copy / EXPERTS_FILE, entry.offset + entry.nbytes - 1)
    src = StoreSource(store_copy, reader=DirectReader(chunk_bytes=ALIGN))
    want = StoreSource(store_copy, verify_checksums=False).read_expert(0, 3)
    with pytest.raises(CorruptFile, match="checksum mismatch for expert 3 of layer 0"):
        src.read_expert(0, 3, out={n: torch.empty_like(t) for n, t in want.items()})


def test_checkpoint_expert_is_few_reads(tiny):
    ckpt = Checkpoint(tiny("mixtral")[0])
    ckpt.read_expert(0, 1)
    assert ckpt.reader.stats()["reads"] <= 3


# ------------------------------------------------------------------------------------------ verify and errors


def test_verify_good_store_cli(tiny, stores, capsys):
    src, _ = tiny("mixtral")
    assert main(["verify", str(stores("mixtral")[0]), "--source", str(src), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("OK") and "bit for bit: 8 experts" in out


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    return err


def test_flipped_expert_byte(store_copy, capsys):
    entry = read_manifest(store_copy).experts[(1, 2)]
    _flip(store_copy / EXPERTS_FILE, entry.offset + 100)
    report = verify(store_copy, progress=False)
    assert not report.ok and len(report.problems) == 1
    assert "checksum mismatch for expert 2 of layer 1" in report.problems[0]
    err = _one_line_error(["verify", str(store_copy), "--quiet"], capsys)
    assert "1 problem" in err
    with pytest.raises(CorruptFile, match="checksum mismatch for expert 2 of layer 1.*re-convert"):
        StoreSource(store_copy).read_expert(1, 2)
    StoreSource(store_copy, verify_checksums=False).read_expert(1, 2)  # asked for: no check


def test_flipped_dense_byte(store_copy, capsys):
    _flip(store_copy / DENSE_FILE, (store_copy / DENSE_FILE).stat().st_size - 5)
    err = _one_line_error(["run", str(store_copy), "--prompt-ids", "1"], capsys)
    assert "dense.safetensors: checksum mismatch" in err


@pytest.mark.parametrize("experts_dtype", ["int8", "bf16"])
def test_verify_converted_dtype_store(tiny, tmp_path, experts_dtype):
    src, _ = tiny("mixtral")
    store = convert(src, tmp_path / "store", progress=False, experts_dtype=experts_dtype)
    report = verify(store, src, progress=False)
    assert report.ok and report.converted and report.experts_compared == 8
    entry = read_manifest(store).experts[(0, 0)]
    _flip(store / EXPERTS_FILE, entry.offset + 7)
    assert "checksum mismatch for expert 0 of layer 0" in verify(store, src, progress=False).problems[0]


def test_verify_with_source_finds_a_different_model(tiny, store_copy):
    report = verify(store_copy, tiny("olmoe")[0], progress=False)
    assert not report.ok and "config.json" in report.problems[0]


def test_truncated_store(store_copy, capsys):
    path = store_copy / EXPERTS_FILE
    os.truncate(path, path.stat().st_size - ALIGN)
    err = _one_line_error(["run", str(store_copy), "--prompt-ids", "1"], capsys)
    assert "experts.bin: truncated" in err and "re-convert" in err


def test_missing_store_file(store_copy, capsys):
    (store_copy / DENSE_FILE).unlink()
    assert "dense.safetensors: missing" in _one_line_error(
        ["run", str(store_copy), "--prompt-ids", "1"], capsys
    )


def test_newer_format_version(store_copy, capsys):
    raw = json.loads((store_copy / MANIFEST).read_text())
    raw["format_version"] = 99
    (store_copy / MANIFEST).write_text(json.dumps(raw))
    err = _one_line_error(["run", str(store_copy), "--prompt-ids", "1"], capsys)
    assert "written by a newer moepager" in err and "moepager convert" in err


def test_corrupt_manifest(store_copy, capsys):
    text = (store_copy / MANIFEST).read_text()
    (store_copy / MANIFEST).write_text(text[: len(text) // 2])
    assert "corrupt manifest" in _one_line_error(["verify", str(store_copy)], capsys)


# ------------------------------------------------------------------------------------------ convert


def test_interrupted_conversion_leaves_nothing(tiny, tmp_path, monkeypatch):
    src, _ = tiny("qwen3_moe")
    calls = []
    real = convert_mod.layout_of

    def failing(weights):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(weights)

    monkeypatch.setattr(convert_mod, "layout_of", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert(src, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_killed_conversion_is_cleaned_up_by_the_next(tiny, tmp_path):
    dead = tmp_path / ".out.partial-999999999"  # no such process
    dead.mkdir()
    (dead / "experts.bin").write_bytes(b"half")
    convert(tiny("mixtral")[0], tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_needs_force(tiny, tmp_path, capsys):
    src, _ = tiny("mixtral")
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--quiet"]) == 0
    assert "--force" in _one_line_error(["convert", str(src), str(out), "--quiet"], capsys)
    assert main(["convert", str(src), str(out), "--quiet", "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    assert "not a moepager store" in _one_line_error(["convert", str(src), str(other), "--force"], capsys)
    assert (other / "precious.txt").exists()


def test_sharded_checkpoint_converts(tmp_path, capsys):
    from tiny_models import build

    build("olmoe", tmp_path / "src", max_shard_size="20KB")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--quiet"]) == 0
    assert main(["verify", str(tmp_path / "out"), "--source", str(tmp_path / "src"), "--quiet"]) == 0
    capsys.readouterr()
    assert "already a moepager store" in _one_line_error(
        ["convert", str(tmp_path / "out"), str(tmp_path / "x")], capsys
    )


def test_tokenizer_files_are_copied(tiny, tmp_path):
    from tiny_models import write_word_tokenizer

    src = tmp_path / "src"
    shutil.copytree(tiny("mixtral")[0], src)
    write_word_tokenizer(src)
    engine = moepager.load(convert(src, tmp_path / "out", progress=False))
    assert engine.tokenizer is not None and engine.tokenizer.encode("w5 w7") == [5, 7]


# ------------------------------------------------------------------------------------------ reader


def _ranges(size):
    g = torch.Generator().manual_seed(0)
    out = [(0, 1), (1, ALIGN), (size - 3, 3), (ALIGN - 1, 2), (0, size)]
    for _ in range(20):
        a = int(torch.randint(0, size - 1, (1,), generator=g))
        out.append((a, int(torch.randint(1, size - a + 1, (1,), generator=g))))
    return out


@pytest.mark.parametrize("where", ["disk", "shm"])
def test_reader_direct_and_fallback_give_the_same_bytes(tmp_path, where):
    folder = tmp_path if where == "disk" else Path("/dev/shm")
    if not folder.is_dir():
        pytest.skip("no /dev/shm")
    path = folder / f"moepager-test-{os.getpid()}.bin"
    data = os.urandom(5 * ALIGN + 123)  # not a multiple of ALIGN: the last read stops short
    path.write_bytes(data)
    try:
        direct, fallback = DirectReader(), DirectReader(direct=False)
        assert not fallback.is_direct(path)
        for off, n in _ranges(len(data)):
            assert bytes(direct.read(path, off, n)) == data[off : off + n]
            assert bytes(fallback.read(path, off, n)) == data[off : off + n]
        got = direct.read_ranges([(path, 10, 5), (path, 3 * ALIGN, 7), (path, 0, 2)])
        assert [bytes(v) for v in got] == [data[10:15], data[3 * ALIGN : 3 * ALIGN + 7], data[0:2]]
        with pytest.raises(CorruptFile, match="truncated"):
            direct.read(path, len(data) - 10, 20)
        assert direct.stats()["bytes_requested"] > 0 and direct.stats()["read_seconds"] > 0
    finally:
        path.unlink()


def test_scattered_ranges_are_read_together_through_native_aio(tmp_path, monkeypatch):
    """An expert's tensors lie in three places of a GGUF: their reads go to the disk at once (one io_submit),
    with the same bytes as one preadv after another, a short read at the end of the file included."""
    if open_context() is None:
        pytest.skip("no native AIO on this kernel or architecture")
    path = tmp_path / "data.bin"
    data = os.urandom(300 * ALIGN + 123)
    path.write_bytes(data)
    ranges = [(path, 200 * ALIGN + 5, 3 * ALIGN), (path, 7, 2 * ALIGN), (path, 100 * ALIGN, ALIGN + 1),
              (path, len(data) - 50, 50)]  # fmt: skip
    want = [data[off : off + n] for _, off, n in ranges]
    reader = DirectReader()
    assert [bytes(v) for v in reader.read_ranges(ranges)] == want
    assert reader._aio_contexts and reader.stats()["reads"] == len(ranges)  # one request per span, together
    monkeypatch.setenv("MOEPAGER_NO_AIO", "1")
    plain = DirectReader()
    assert [bytes(v) for v in plain.read_ranges(ranges)] == want and not plain._aio_contexts
    reader.close()  # a context closed with the files: later reads go the plain way, same bytes
    assert [bytes(v) for v in reader.read_ranges(ranges)] == want


def test_native_aio_reads_into_aligned_buffers_and_refuses_a_bad_request(tmp_path):
    ctx = open_context(depth=4)
    if ctx is None:
        pytest.skip("no native AIO on this kernel or architecture")
    path = tmp_path / "data.bin"
    data = os.urandom(8 * ALIGN)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    try:
        buf = aligned_buffer(3 * ALIGN)
        base = np.frombuffer(buf, dtype=np.uint8).ctypes.data
        got = ctx.read([(fd, base, ALIGN, 5 * ALIGN), (fd, base + ALIGN, 2 * ALIGN, 0)])
        assert got == [ALIGN, 2 * ALIGN]
        assert bytes(buf[:ALIGN]) == data[5 * ALIGN : 6 * ALIGN] and bytes(buf[ALIGN:]) == data[: 2 * ALIGN]
        assert ctx.read([(fd, base, ALIGN, 7 * ALIGN)] * 5) is None  # more than its depth: the caller reads
        assert ctx.read([(-1, base, ALIGN, 0)]) is None  # a bad descriptor: io_submit refuses the batch
    finally:
        os.close(fd)
        ctx.close()
    assert ctx.read([(fd, base, ALIGN, 0)]) is None


def _resident_pages(path: Path) -> int | None:
    """Pages of the file in the page cache, by mincore(2); None where that cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]  # fmt: skip
        size = path.stat().st_size
        pages = (size + 4095) // 4096
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            vec = (ctypes.c_ubyte * pages)()
            rc = libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec)
            libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
        finally:
            os.close(fd)
        return None if rc != 0 else sum(b & 1 for b in vec)
    except (OSError, AttributeError):
        return None


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.parametrize("direct", [True, False])
def test_expert_reads_leave_no_pages_cached(tiny, tmp_path, direct):
    src = tmp_path / "src"
    shutil.copytree(tiny("mixtral")[0], src)
    store = convert(src, tmp_path / "store", progress=False)
    files = [src / "model.safetensors", store / EXPERTS_FILE]
    reader = DirectReader(direct=direct)
    sources = [
        Checkpoint(src, reader=reader),
        StoreSource(store, reader=reader),
    ]  # headers read, then evicted
    for f in files:
        _evict(f)
        if _resident_pages(f) != 0:
            pytest.skip("page-cache residency cannot be observed or forced here")
    for source in sources:
        for key in source.expert_keys():
            source.read_expert(*key)
    assert reader.is_direct(files[0]) == direct
    assert [_resident_pages(f) for f in files] == [0, 0]
    (store / EXPERTS_FILE).read_bytes()  # a plain read does fill the cache: the check above can see pages
    assert _resident_pages(store / EXPERTS_FILE) > 0
