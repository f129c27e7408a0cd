"""MiniLM sentence embeddings equal transformers' BertModel + mean pooling (interop).

Reference: ``transformers.BertModel`` loaded from the same checkpoint directory, tokenized by
``transformers``' own tokenizer, mean-pooled over the attention mask (sentence-transformers' pooling).
Tolerance 1e-4 max abs (the issue's bound); float32 on CPU gives ~1e-6.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.models.bert import BertLinen, bert_nnx_from_params, mean_pool
from jaxpeft.models.pretrained import encode, load_pretrained, load_tokenizer
from _sentences import SENTENCES

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def reference(minilm_dir):
    import torch
    import transformers

    model = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return batch["input_ids"].numpy(), ((hidden * mask).sum(1) / mask.sum(1)).numpy()


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_minilm_embeddings_equal_transformers(minilm_dir, reference, api):
    ids_ref, want = reference
    config, params = load_pretrained(minilm_dir)
    batch = {k: jnp.asarray(v) for k, v in encode(load_tokenizer(minilm_dir), SENTENCES).items()}
    np.testing.assert_array_equal(np.asarray(batch["input_ids"]), ids_ref)  # same tokenization
    kwargs = dict(attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    if api == "linen":
        hidden = BertLinen(config).apply({"params": params}, batch["input_ids"], **kwargs)
    else:
        hidden = bert_nnx_from_params(config, params)(batch["input_ids"], **kwargs)
    got = np.asarray(mean_pool(hidden, batch["attention_mask"]))
    assert got.shape == (20, 384)
    assert np.abs(got - want).max() <= 1e-4
