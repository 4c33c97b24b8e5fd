"""``POST /v1/embeddings`` of `neo-jax serve` on a bare ``GPTNeoModel`` checkpoint in SGPT's layout, driven with the
official ``openai`` client and raw HTTP, against sentence-transformers' own ``encode``."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
import requests
import transformers

import neo_jax
from tests.test_embed import TEXTS, close, reference, save_sgpt
from tests.test_serve import metric, start_server

TOL = 1e-4


@pytest.fixture(scope="module")
def sgpt(tmp_path_factory):
    return save_sgpt(tmp_path_factory.mktemp("served") / "sgpt")


@pytest.fixture(scope="module")
def server(sgpt):
    process, url = start_server(sgpt, "--max-batch", "4", "--prefill-chunk", "32", "--served-model-name", "sgpt")
    yield url
    process.terminate()
    process.wait(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def test_the_openai_client_gets_sentence_transformers_vectors(server, client, sgpt):
    texts = TEXTS[:3] + TEXTS[4:]  # sentence-transformers cuts TEXTS[3] at 48 tokens; the server takes it whole
    expected = unit(reference(sgpt, texts))  # the checkpoint's weightedmean, normalised as OpenAI's are
    before = metric(server, "neo_jax_embedding_requests_total")
    floats = client.embeddings.create(model="sgpt", input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == list(range(len(texts)))
    assert close(np.array([d.embedding for d in floats.data]), expected) < TOL
    tokenizer = transformers.AutoTokenizer.from_pretrained(sgpt)
    ids = [tokenizer(t)["input_ids"] for t in texts]
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == sum(map(len, ids))
    packed = client.embeddings.create(model="sgpt", input=texts)  # by default the client asks for base64 and decodes it
    assert close(np.array([d.embedding for d in packed.data]), expected) < TOL
    raw = requests.post(
        server + "/v1/embeddings", json={"model": "sgpt", "input": texts[0], "encoding_format": "base64"}
    ).json()
    vector = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4")
    assert close(vector, expected[0]) < TOL and raw["object"] == "list" and raw["data"][0]["object"] == "embedding"
    by_ids = client.embeddings.create(model="sgpt", input=ids, encoding_format="float", dimensions=64)
    assert close(np.array([d.embedding for d in by_ids.data]), expected) < TOL
    one = client.embeddings.create(model="sgpt", input=ids[1], encoding_format="float")
    assert len(one.data) == 1 and close(np.array(one.data[0].embedding), expected[1]) < TOL
    assert metric(server, "neo_jax_embedding_requests_total") - before == 3 * len(texts) + 2
    assert metric(server, "neo_jax_embedding_tokens_total") > 0


def test_completions_work_on_the_bare_model(client, sgpt):
    """A GPTNeoModel checkpoint has no head of its own: GPT-Neo's is the token embedding, so it continues text."""
    model = neo_jax.from_pretrained(sgpt, task="causal-lm", progress=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(sgpt)
    prompt = tokenizer("The cat sat")["input_ids"]
    expected = neo_jax.generate(model, np.array(prompt), max_new_tokens=6, eos_token_id=None)[0, len(prompt) :]
    answer = client.completions.create(model="sgpt", prompt=prompt, max_tokens=6, temperature=0)
    assert answer.choices[0].text == tokenizer.decode(expected)


BAD = [  # (body, status, param, words in the message)
    ({"input": ""}, 400, "input", "input is empty"),
    ({"input": ["fine", ""]}, 400, "input", "input[1] is empty"),
    ({"input": []}, 400, "input", "input is empty"),
    ({"input": [[1] * 257]}, 400, "input", "maximum context length is 256 tokens"),
    ({"input": "word " * 300}, 400, "input", "maximum context length is 256 tokens"),
    ({"input": [50257]}, 400, "input", "must be in [0, 50257)"),
    ({"input": "hi", "dimensions": 32}, 400, "dimensions", "this model's width, 64"),
    ({"input": "hi", "encoding_format": "int8"}, 400, "encoding_format", "float"),
    ({"input": 5}, 400, "input", "input"),
    ({"input": "hi", "model": "other"}, 404, "model", "does not exist"),
    ({"input": ["x"] * 257}, 400, "input", "more than this server ever queues"),
]


def test_bad_embedding_requests_are_openai_400s_and_the_server_keeps_serving(server, client):
    for body, status, param, words in BAD:
        r = requests.post(server + "/v1/embeddings", json={"model": "sgpt", **body})
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == param and words in error["message"], (body, error)
    assert len(client.embeddings.create(model="sgpt", input="still here", encoding_format="float").data) == 1
