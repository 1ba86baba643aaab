"""Writes fixtures/gguf/tensors.gguf: one small tensor of each type the GGUF loader reads (F32, F16,
BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) and metadata of every value type, with the `gguf`
package (llama.cpp's gguf-py, pinned in requirements.txt). Quantized blocks are random bytes with
finite scales; fixtures/gguf/tensors.expected.safetensors holds what gguf-py's reference
dequantization (the numpy port of ggml's dequantize_row_*) makes of each, as F32.

Run: .venv/bin/python scripts/make_gguf_fixtures.py
"""

from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "gguf"
Q = gguf.GGMLQuantizationType

# Byte ranges of each block's f16 scales: random bytes there could be NaN or inf.
F16_FIELDS = {
    Q.Q8_0: [0],
    Q.Q4_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
}


def quantized(rng: np.random.Generator, qtype, rows: int, cols: int) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rows * cols // block
    raw = rng.integers(0, 256, size=(blocks, size), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        scale = rng.uniform(-0.05, 0.05, size=blocks).astype(np.float16)
        raw[:, at : at + 2] = scale.view(np.uint8).reshape(blocks, 2)
    return raw.reshape(rows, cols // block * size)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(OUT / "tensors.gguf", "llama")
    writer.add_uint32("test.u32", 7)
    writer.add_int32("test.i32", -3)
    writer.add_float32("test.f32", 0.5)
    writer.add_bool("test.bool", True)
    writer.add_string("test.string", "héllo")
    writer.add_array("test.strings", ["a", "bc", ""])
    writer.add_array("test.ints", [1, 2, 3])
    writer.add_uint64("test.u64", 1 << 40)
    writer.add_float64("test.f64", -2.25)
    expected = {}
    rows, cols = 3, 512
    dense = rng.standard_normal((rows, cols)).astype(np.float32)
    writer.add_tensor("f32", dense)
    expected["f32"] = dense
    writer.add_tensor("f16", dense.astype(np.float16))
    expected["f16"] = dense.astype(np.float16).astype(np.float32)
    bf16 = gguf.quants.quantize(dense, Q.BF16)
    writer.add_tensor("bf16", bf16, raw_dtype=Q.BF16)
    expected["bf16"] = gguf.quants.dequantize(bf16, Q.BF16).astype(np.float32)
    for qtype in [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]:
        raw = quantized(rng, qtype, rows, cols)
        name = qtype.name.lower()
        writer.add_tensor(name, raw, raw_dtype=qtype)
        expected[name] = gguf.quants.dequantize(raw, qtype).astype(np.float32)
        assert expected[name].shape == (rows, cols), (name, expected[name].shape)
        assert np.isfinite(expected[name]).all(), name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file({k: np.ascontiguousarray(v) for k, v in expected.items()},
              str(OUT / "tensors.expected.safetensors"),
              metadata={"gguf": gguf.__name__ + " " + __import__("importlib.metadata").metadata.version("gguf")})
    print(f"wrote {OUT / 'tensors.gguf'} and the expected values of {len(expected)} tensors")


if __name__ == "__main__":
    main()
