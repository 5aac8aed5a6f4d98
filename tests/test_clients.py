"""Clients people already run, against a real kvgraph server on loopback: LangChain's ChatOpenAI with
structured output, and lm-evaluation-harness's local-completions model computing log-likelihoods on a task
this test writes (the openai client is exercised throughout test_server.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from test_server import start_server, stop

pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client_server(tiny_llama):
    proc, base = start_server(tiny_llama[0], "-c", "512", "--parallel", "2")
    yield base
    stop(proc)


def test_langchain_chat_openai_with_structured_output(client_server):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=6)
        age: int = Field(ge=0, le=120)

    llm = ChatOpenAI(base_url=client_server + "/v1", api_key="none", model="tiny", temperature=0.7, seed=1,
                     max_tokens=60, max_retries=0)
    person = llm.with_structured_output(Person, method="json_schema").invoke("Make up a person.")
    assert isinstance(person, Person) and 0 <= person.age <= 120
    reply = llm.invoke("hello")                               # and plain chat through the same client
    assert isinstance(reply.content, str) and reply.response_metadata["model_name"] == "tiny"


def test_lm_evaluation_harness_log_likelihoods(client_server, tiny_llama, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager
    from kvgraph.api import LLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    docs = [{"question": "the cat sat on the", "choices": [" mat", " dog", " sun"], "answer": 0},
            {"question": "a dog ran in the", "choices": [" sun", " cat"], "answer": 0}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "task.yaml").write_text(
        "task: kvgraph_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=["kvgraph_tiny"], task_manager=TaskManager(include_path=str(tmp_path)),
        model_args=f"base_url={client_server}/v1/completions,model=tiny,num_concurrent=1,max_retries=1",
        log_samples=True)
    assert 0.0 <= out["results"]["kvgraph_tiny"]["acc,none"] <= 1.0
    # every log-likelihood equals what kvgraph computes for the same tokens in process
    llm = LLM(str(tiny_llama[0]), n_ctx=256)
    for sample in out["samples"]["kvgraph_tiny"]:
        for (context, continuation), resp in zip([a for a in sample["arguments"]], sample["resps"]):
            ctx_ids = llm.tokenize(context)
            ids = ctx_ids + llm.tokenize(continuation)
            logits = llm.logits(ids).astype(np.float64)
            lsm = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - logits.max(-1, keepdims=True)
            want = sum(lsm[i - 1, ids[i]] for i in range(len(ctx_ids), len(ids)))
            assert abs(resp[0][0] - want) < 1e-3, (context, continuation, resp, want)
