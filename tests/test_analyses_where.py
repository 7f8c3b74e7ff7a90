"""Tests of "where the fact lives" (issue 16): logit lens, linear probes, CKA drift and
generalization onset — each against an independent reference written here (plain loops, a plain
transformers forward, the explicit-centering-matrix HSIC formula), on synthetic arrays and on tiny
captured runs with real checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from rotelab.errors import RotelabError
from rotelab.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- logit lens: pure function

def _rms_norm_np(h: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    return g * h / np.sqrt(np.mean(h * h) + eps)


def test_logit_lens_matches_loops():
    from rotelab.analyses.logit_lens import logit_lens

    rng = np.random.default_rng(0)
    L, N, H, V = 3, 5, 8, 40
    X = rng.normal(size=(L, N, H)).astype(np.float32)
    X[1, 2] = np.nan  # a missing row
    g = rng.uniform(0.5, 1.5, size=H).astype(np.float32)
    W = rng.normal(size=(V, H)).astype(np.float32)
    W[7] = W[3]  # an exact tie: both tokens get the same logit
    t = rng.integers(0, V, size=N)
    t[0] = 3
    eps = 1e-6

    def norm(h):
        return torch.as_tensor(g) * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)

    lin = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.as_tensor(W))
    lp, rk = logit_lens(X, t, norm, lin, chunk=4)
    assert lp.shape == (L, N) and lp.dtype == np.float32 and rk.dtype == np.int32
    for li in range(L):
        for i in range(N):
            if li == 1 and i == 2:
                assert math.isnan(lp[li, i]) and rk[li, i] == -1
                continue
            z = [float(np.dot(W[j].astype(np.float64), _rms_norm_np(X[li, i].astype(np.float64), g, eps))) for j in range(V)]
            m = max(z)
            lse = m + math.log(sum(math.exp(x - m) for x in z))
            assert lp[li, i] == pytest.approx(z[t[i]] - lse, abs=1e-4)
            assert rk[li, i] == sum(1 for x in z if x > z[t[i]] + 1e-9)
    with pytest.raises(RotelabError, match="targets"):
        logit_lens(X, t[:3], norm, lin)


# --------------------------------------------------------------------------- logit lens: tiny runs

@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def lens_run(request, tmp_path_factory):
    from fixtures_runs import make_tiny_run
    from rotelab.probe import capture_run

    run = make_tiny_run(tmp_path_factory.mktemp(f"lens-{request.param}"), n_checkpoints=2, model=request.param)
    capture_run(run, kinds=["key", "test"], progress=False)
    return run


def test_logit_lens_last_block_equals_plain_forward(lens_run):
    """Done when: at the last block the lens equals a plain transformers forward's log-softmax of
    the object's first token at the last prompt position, within the float16 tolerance of the
    stored state (:func:`float16_tolerance`, derived in the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rotelab.analyses.logit_lens import final_norm_and_head, float16_tolerance, logit_lens_run
    from rotelab.analyses.where import where_run
    from rotelab.tokenization import encode

    run = lens_run
    st = Store.open(run.store_path, fingerprint=run.fingerprint())
    written = logit_lens_run(run, st, ["key", "test"], progress=False)
    n_layers = len(st.kind("key").layers)
    assert written == {"key": 2 * n_layers, "test": 2 * n_layers}
    assert logit_lens_run(run, st, ["key", "test"], progress=False) == {"key": 0, "test": 0}  # resumable
    worst = []
    for c in ("base", "p1-e01"):
        path = run.checkpoint_dir(c)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(path)
        norm, head = final_norm_and_head(model)
        is_gpt2 = model.config.model_type == "gpt2"
        assert norm is (model.transformer.ln_f if is_gpt2 else model.model.norm)
        for kind in ("key", "test"):
            g = st.kind(kind)
            last = g.layers[-1]
            lp = g.read_derived("logit_lens_logprob", checkpoints=[c], layers=[last])[0, 0]
            rk = g.read_derived("logit_lens_rank", checkpoints=[c], layers=[last])[0, 0]
            tol = float16_tolerance(g.read_slab(c, last), norm, head.weight.detach().numpy(), centered=is_gpt2)
            for i, (text, obj) in enumerate(zip(g.items["text"], g.items["object"])):
                t = encode(tok, text, obj).answer_ids[0]
                ids = torch.tensor([tok(text)["input_ids"]])
                with torch.no_grad():
                    z = model(input_ids=ids).logits[0, -1].double()
                want = float(torch.log_softmax(z, -1)[t])
                assert abs(lp[i] - want) <= tol[i], (c, kind, i, lp[i], want, tol[i])
                lo = int((z > z[t] + tol[i]).sum())
                hi = int((z > z[t] - tol[i]).sum())
                assert lo <= rk[i] <= hi
                worst.append((abs(lp[i] - want), tol[i]))
    err, tol = np.array(worst).T
    assert tol.max() < 0.1  # the tolerance is tight enough to mean something
    assert err.max() < tol.max()
    # the stage hook writes nothing more (everything committed)
    out = where_run(run, st, ["key", "test"], progress=False, note=lambda m: None)
    assert sum(out["logit_lens"].values()) == 0
