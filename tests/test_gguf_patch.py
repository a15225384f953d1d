"""llama.cpp compatibility: `dus gguf-patch` on real GGUF files, and what plan, upscale and the card say.

The GGUFs here are written with the gguf package (the keys and tensors llama.cpp's converter writes
for these settings); the end-to-end comparison with llama.cpp itself is benchmarks/gguf_compat.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from dus_plugin.architecture import upscaled_config
from dus_plugin.cli import main
from dus_plugin.fixtures import family_config
from dus_plugin.llamacpp import compat, notes_for, period_pattern
from dus_plugin.plan import solar_plan


def gemma3_config(n: int, **extra) -> dict:
    """A Gemma 3 text config.json dict whose attention scale is llama.cpp's (query_pre_attn_scalar = head_dim)."""
    cfg = family_config("gemma3", vocab=64, layers=n)
    return type(cfg)(**{**cfg.to_dict(), "query_pre_attn_scalar": 8, **extra}).to_dict()


def model_dir(tmp_path: Path, config: dict, name: str = "model") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_gguf(path: Path, arch: str, n: int, swa_pattern=None) -> Path:
    """A GGUF with the keys llama.cpp's gemma converters write, a string array and tensors of two types."""
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(n)
    w.add_sliding_window(16)
    w.add_token_list(["<pad>", "<s>", "</s>", "hello"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    if swa_pattern is not None:
        w.add_sliding_window_pattern(swa_pattern)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((4, 8)).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((8, 8)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fields(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def tensors(path: Path) -> dict:
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}


def upscaled_gemma3(tmp_path: Path, n: int, m: int) -> Path:
    base = gemma3_config(n)
    return model_dir(tmp_path, upscaled_config(base, solar_plan(base["num_hidden_layers"], m).layer_map))


def test_patch_writes_the_layer_types_and_keeps_everything_else(tmp_path: Path) -> None:
    folder = upscaled_gemma3(tmp_path, 26, 6)  # Gemma 3 1B's depth, dus's default m: n - 2m = 14
    types = json.loads((folder / "config.json").read_text())["layer_types"]
    wanted = [t == "sliding_attention" for t in types]
    assert wanted != period_pattern(40, 6)  # the defect: llama.cpp's index rule picks other layers
    path = write_gguf(tmp_path / "m.gguf", "gemma3", 40)
    before_fields, before_tensors = fields(path), tensors(path)

    r = CliRunner().invoke(main, ["gguf-patch", str(path), str(folder), "-q"])

    assert r.exit_code == 0, r.output
    assert "patched" in r.output
    after = fields(path)
    assert after.pop("gemma3.attention.sliding_window_pattern") == wanted
    assert after == before_fields
    assert all(np.array_equal(before_tensors[k], v) for k, v in tensors(path).items())
    assert not list(tmp_path.glob(".m.gguf.tmp-*"))
    again = CliRunner().invoke(main, ["gguf-patch", str(path), str(folder)])  # idempotent
    assert again.exit_code == 0 and "nothing to patch" in again.output


@pytest.mark.parametrize("n, m", [(12, 3), (26, 10)])  # n - 2m = 6 and 6: the period rule agrees
def test_nothing_needed_leaves_the_file_alone(tmp_path: Path, n: int, m: int) -> None:
    folder = upscaled_gemma3(tmp_path, n, m)
    path = write_gguf(tmp_path / "m.gguf", "gemma3", 2 * (n - m))
    digest = sha(path)
    r = CliRunner().invoke(main, ["gguf-patch", str(path), str(folder)])
    assert r.exit_code == 0 and "nothing to patch" in r.output
    assert sha(path) == digest


def test_an_existing_period_key_is_read_as_llama_cpp_reads_it(tmp_path: Path) -> None:
    folder = upscaled_gemma3(tmp_path, 12, 3)  # layer_types follow period 6
    path = write_gguf(tmp_path / "m.gguf", "gemma3", 18, swa_pattern=3)  # but the file says period 3
    r = CliRunner().invoke(main, ["gguf-patch", str(path), str(folder)])
    assert r.exit_code == 0 and "patched" in r.output
    assert fields(path)["gemma3.attention.sliding_window_pattern"] == period_pattern(18, 6)


@pytest.mark.parametrize("arch, layers, expected", [
    ("llama", 40, "is a 'llama' GGUF, but"),
    ("gemma3", 26, "has 26 layers, but"),
])
def test_refuses_a_gguf_of_another_model(tmp_path: Path, arch: str, layers: int, expected: str) -> None:
    folder = upscaled_gemma3(tmp_path, 26, 6)
    path = write_gguf(tmp_path / "m.gguf", arch, layers)
    digest = sha(path)
    r = CliRunner().invoke(main, ["gguf-patch", str(path), str(folder)])
    assert r.exit_code == 1
    assert expected in r.output and len(r.output.strip().splitlines()) == 1
    assert sha(path) == digest


def test_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    folder = upscaled_gemma3(tmp_path, 26, 6)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    mamba = model_dir(tmp_path, {"model_type": "mamba", "num_hidden_layers": 4}, "mamba")
    cases = [([str(junk), str(folder)], "is not a readable GGUF file"),
             ([str(tmp_path / "none.gguf"), str(folder)], "does not exist"),
             ([str(junk), str(tmp_path)], "has no config.json"),
             ([str(junk), str(mamba)], "not model_type 'mamba'")]
    for args, expected in cases:
        r = CliRunner().invoke(main, ["gguf-patch", *args])
        assert r.exit_code == 1 and expected in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1


def test_never_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = upscaled_gemma3(tmp_path, 26, 6)
    path = write_gguf(tmp_path / "m.gguf", "gemma3", 40)
    digest = sha(path)
    calls = []

    def fail_second(self, tensor, tensor_endianess=None):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, tensor, tensor_endianess)

    original = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fail_second)
    r = CliRunner().invoke(main, ["gguf-patch", str(path), str(folder)])
    assert r.exit_code == 130
    assert sha(path) == digest and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "model"]


def test_a_copy_with_changed_tensor_bytes_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = upscaled_gemma3(tmp_path, 26, 6)
    path = write_gguf(tmp_path / "m.gguf", "gemma3", 40)
    digest = sha(path)
    original = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data",
                        lambda self, t, tensor_endianess=None: original(self, np.zeros_like(t), tensor_endianess))
    r = CliRunner().invoke(main, ["gguf-patch", str(path), str(folder)])
    assert r.exit_code == 1 and "differs from it in its tensors" in r.output
    assert sha(path) == digest


def test_plan_notes_name_the_patch_and_the_overlaps_that_need_none() -> None:
    base = gemma3_config(26)
    notes = notes_for(base, solar_plan(base["num_hidden_layers"], 6).layer_map)
    assert len(notes) == 1 and "dus gguf-patch" in notes[0]
    assert "--drop 1, 4, 7, 10 would need no patch" in notes[0]  # 26 - 2m a multiple of 6
    assert notes_for(base, solar_plan(base["num_hidden_layers"], 4).layer_map) == []
    llama = family_config("llama", vocab=64, layers=32).to_dict()
    assert notes_for(llama, solar_plan(llama["num_hidden_layers"], 8).layer_map) == []
    assert not compat(family_config("phi3", vocab=64).to_dict()).checked


def test_the_27b_attention_scale_is_warned_and_not_blamed_twice() -> None:
    # Gemma 3 27B: query_pre_attn_scalar = hidden/heads (168) != head_dim (128), 62 layers
    base = gemma3_config(62, head_dim=16)
    assert compat(base).mismatch is None  # llama.cpp takes hidden/heads at exactly 62 layers
    notes = notes_for(base, solar_plan(base["num_hidden_layers"], 15).layer_map)
    warning = next(n for n in notes if n.startswith("llama.cpp will compute"))
    assert "query_pre_attn_scalar is 8" in warning and "unless the model has exactly 62 layers" in warning
    assert "no overlap m avoids it" in warning
    # a base llama.cpp already gets wrong: said once, about the base
    wrong_base = gemma3_config(12, query_pre_attn_scalar=256)
    notes = notes_for(wrong_base, solar_plan(wrong_base["num_hidden_layers"], 3).layer_map)
    assert notes and all("llama.cpp will compute" not in n for n in notes)
    assert "computes the base itself differently" in notes[-1]


def test_plan_upscale_and_card_say_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from dus_plugin.fixtures import make_tiny_model

    base = make_tiny_model("gemma3", tmp_path / "base", layers=26)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "query_pre_attn_scalar": 8}))
    runner = CliRunner()
    r = runner.invoke(main, ["plan", str(base), "-o", str(tmp_path / "r.yml")])
    assert r.exit_code == 0 and "dus gguf-patch" in r.output
    assert "dus gguf-patch" in (tmp_path / "r.yml").read_text()  # the recipe carries the note
    with caplog.at_level("WARNING", logger="dus_plugin"):
        r = runner.invoke(main, ["upscale", str(tmp_path / "r.yml"), str(tmp_path / "out"), "-q", "--no-forward"])
    assert r.exit_code == 0, r.output
    assert any("dus gguf-patch" in rec.getMessage() for rec in caplog.records)
    r = runner.invoke(main, ["card", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Run in llama.cpp" in card and "convert_hf_to_gguf.py MODEL_DIR" in card
    assert "dus gguf-patch model.gguf MODEL_DIR" in card and "Warning" not in card


# The real shapes (hidden, heads, head_dim, query_pre_attn_scalar, layers) of the published configs
REAL = {
    "gemma-3-270m": ("gemma3_text", 640, 4, 256, 256, 18),
    "gemma-3-1b": ("gemma3_text", 1152, 4, 256, 256, 26),
    "gemma-3-4b": ("gemma3_text", 2560, 8, 256, 256, 34),
    "gemma-3-12b": ("gemma3_text", 3840, 16, 256, 256, 48),
    "gemma-3-27b": ("gemma3_text", 5376, 32, 128, 168, 62),
    "gemma-2-2b": ("gemma2", 2304, 8, 256, 256, 26),
    "gemma-2-9b": ("gemma2", 3584, 16, 256, 256, 42),
    "gemma-2-27b": ("gemma2", 4608, 32, 128, 144, 46),
}


@pytest.mark.parametrize("name, patch, warned", [
    ("gemma-3-270m", True, False), ("gemma-3-1b", True, False), ("gemma-3-4b", False, False),
    ("gemma-3-12b", False, False), ("gemma-3-27b", True, True),
    ("gemma-2-2b", False, False), ("gemma-2-9b", False, False), ("gemma-2-27b", False, True),
])
def test_real_gemma_sizes_at_the_default_overlap(name: str, patch: bool, warned: bool) -> None:
    import transformers as tf

    model_type, hidden, heads, head_dim, scalar, n = REAL[name]
    cls = tf.Gemma3TextConfig if model_type == "gemma3_text" else tf.Gemma2Config
    base = cls(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=head_dim,
               query_pre_attn_scalar=scalar, num_hidden_layers=n, vocab_size=256).to_dict()
    assert compat(base).mismatch is None and not compat(base).needs_patch  # the base runs right in llama.cpp
    notes = notes_for(base, solar_plan(base["num_hidden_layers"]).layer_map)
    assert any("dus gguf-patch" in line for line in notes) == patch
    assert any(line.startswith("llama.cpp will compute") for line in notes) == warned


def test_a_copy_with_another_pattern_is_caught_before_it_replaces_the_file(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    folder = upscaled_gemma3(tmp_path, 26, 6)
    path = write_gguf(tmp_path / "m.gguf", "gemma3", 40)
    digest = sha(path)
    original = gguf.GGUFWriter.add_array
    monkeypatch.setattr(gguf.GGUFWriter, "add_array", lambda self, key, val: original(self, key, [not v for v in val]))
    r = CliRunner().invoke(main, ["gguf-patch", str(path), str(folder)])
    assert r.exit_code == 1 and "reads back another sliding-window pattern" in r.output
    assert sha(path) == digest and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "model"]
