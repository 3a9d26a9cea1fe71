"""bench/ablations.py's pipeline (experiments.ablations) end to end in --tiny mode: every variant x seed is trained,
scored and cached; a rerun is served from the cache; the report lists every variant."""

import json
import math
from pathlib import Path

import pytest

from experiments import ablation_data, ablations
from experiments.ablations import VARIANTS, AblationConfig

pytestmark = pytest.mark.slow  # pre-trains and extends a tiny base for every variant: minutes


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablations")
    doc = out / "doc.md"
    doc.write_text("# Ablations\n\nHand-written text stays.\n")
    cfg = AblationConfig(
        output_dir=str(out),
        tiny=True,
        seeds=[0, 1],
        doc=str(doc),
        command="python x.py --tiny",
        pretrain_books="austen+kjv",
        variants=",".join(VARIANTS),
    )
    return cfg, ablations.main(cfg), doc


def test_every_variant_and_seed_has_finite_results(tiny_run):
    cfg, out, _ = tiny_run
    assert list(out["results"]) == list(VARIANTS)
    files = sorted((Path(cfg.output_dir) / "results").glob("*.json"))
    trained = [v for v in VARIANTS if ablations.variant_settings(cfg, v)["train"]]
    assert len(files) == 2 * len(trained) + (len(VARIANTS) - len(trained))
    for vid, runs in out["results"].items():
        assert [r["seed"] for r in runs] == ([0, 1] if vid in trained else [0])
        for r in runs:
            assert set(r["perplexity"]) == {"64", "128", "256"}
            assert all(math.isfinite(p) and 1 < p < 2 * cfg.vocab_size for p in r["perplexity"].values())
            assert 0 <= r["passkey"] <= 1 and r["passkey_trials"] == 5
            assert r["tokens_scored"] == cfg.eval_tokens - 2  # 2 windows of 256, position 0 unscored in the first
    # training moved the model: LoRA+ differs from interpolation alone, and seeds differ from each other
    pi = out["results"]["pi"][0]["perplexity"]["256"]
    lp = [r["perplexity"]["256"] for r in out["results"]["loraplus-full"]]
    assert all(abs(p - pi) > 1e-3 for p in lp) and abs(lp[0] - lp[1]) > 1e-6
    # YaRN is another RoPE than PI, untrained and trained
    assert abs(out["results"]["yarn"][0]["perplexity"]["256"] - pi) > 1e-3
    assert out["results"]["loraplus-s2-yarn"][0]["settings"]["rope"] == "yarn"
    # variants that differ only in attention at training time still give different models
    s2 = out["results"]["loraplus-s2"][0]["perplexity"]["256"]
    assert s2 != out["results"]["loraplus-s2-rolled"][0]["perplexity"]["256"]
    assert s2 != out["results"]["loraplus-s2-gsched"][0]["perplexity"]["256"]  # 2 steps: groups 1/8 then 1/4


def test_report_lists_every_variant_and_keeps_the_doc(tiny_run):
    cfg, out, doc = tiny_run
    text = doc.read_text()
    assert text.startswith("# Ablations\n\nHand-written text stays.\n")
    assert text.count("<!-- ablation:main -->") == 1 and "python x.py --tiny" in text
    for vid, v in VARIANTS.items():
        assert f"| {v['label']} | `{vid}` |" in text
    assert (doc.parent / "doc_main.png").stat().st_size > 5000
    summary = json.loads((doc.parent / "summary-main.json").read_text())
    assert summary["pretrain"]["books"][-1] == "kjv_bible[:90%]"
    assert sorted(p.name for p in doc.parent.glob("held-out-*/*.txt")) == ["1_persuasion.txt", "2_kjv_tail.txt"]


def test_rerun_is_served_from_the_cache(tiny_run, monkeypatch):
    cfg, out, doc = tiny_run

    def no_training(*args, **kwargs):
        raise AssertionError("retrained a cached result")

    monkeypatch.setattr(ablations, "extend", no_training)
    monkeypatch.setattr(ablations, "evaluate", no_training)
    again = ablations.main(cfg)
    assert again["results"] == out["results"]
    assert doc.read_text().count("<!-- ablation:main -->") == 1


def test_held_out_text_is_never_trained_on(tiny_run):
    cfg, _, _ = tiny_run
    head, tail = ablation_data._kjv_split()
    assert len(tail) / (len(head) + len(tail)) == pytest.approx(ablation_data.HELD_OUT_KJV, abs=0.01)
    texts = ablation_data.train_texts()
    assert "austen_persuasion" not in texts and texts["kjv_bible[:90%]"] == head
    assert tail[:2000] not in head


def test_bad_flags_are_one_line():
    with pytest.raises(ValueError, match="--variants nope: unknown nope"):
        AblationConfig(variants="nope")
    with pytest.raises(ValueError, match="--seeds"):
        AblationConfig(seeds=[])


def test_context_mix_suite_reports_retrieval_repeats_and_the_heat_map(tmp_path):
    """--context_mix with a copy phase: every variant gets passkey by length and depth and repeat perplexities, and
    the section gains the retrieval table and the repeats / heat-map plot."""
    doc = tmp_path / "doc.md"
    cfg = AblationConfig(
        output_dir=str(tmp_path),
        tiny=True,
        seeds=[0],
        doc=str(doc),
        section="context",
        context_mix=True,
        copy_steps=2,
        variants="base,pi,yarn,loraplus-s2-yarn",
    )
    out = ablations.main(cfg)
    for runs in out["results"].values():
        r = runs[0]
        assert r["passkey_cells"] and all(0 <= c["accuracy"] <= 1 for c in r["passkey_cells"])
        assert set(r["repeat"]) >= {"first"} and all(math.isfinite(v) and v > 1 for v in r["repeat"].values())
    text = doc.read_text()
    assert "Retrieval and long-range copying" in text and "2 steps on random-token rows" in text
    assert (tmp_path / "doc_context_context.png").stat().st_size > 5000
    assert "(doc_context_context.png)" in text
