import math

import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score as sk_silhouette

import gce.evaluate as evaluate_module
from gce.attacks import AttackConfig, build_attack
from gce.evaluate import batches, evaluate_robustness, expand_eps, format_eps
from gce.latent import (
    class_separation,
    confusion_matrix,
    latent_clusters,
    pca_embedding,
    penultimate_features,
    silhouette_score,
)

N = 200  # test examples per evaluation: enough for stable fractions, fast on a CPU


def deterministic(eps):
    """Attacks without random starts: their per-example outcome does not depend on batch composition."""
    return (expand_eps(AttackConfig(name="fgsm"), eps) + expand_eps(AttackConfig(name="bim", steps=5), eps)
            + expand_eps(AttackConfig(name="pgd", steps=5, random_start=False), eps))


def test_robust_below_clean_and_worst_case_below_every_attack(model, mnist5k):
    attacks = deterministic([0.1, 0.2]) + expand_eps(AttackConfig(name="pgd", steps=5, loss="cw"), [0.1, 0.2])
    res = evaluate_robustness(model, mnist5k.test, attacks, max_examples=N)
    assert res.n == N and 0.7 < res.clean_acc <= 1
    for (label, eps), flags in res.robust.items():
        assert not (flags & ~res.clean_correct).any()  # robust implies clean-correct, per example
        assert res.accuracy[label][eps] <= res.clean_acc
        assert res.worst_case[("linf", eps)] <= res.accuracy[label][eps]
    for (_, eps), worst in res.worst_robust.items():
        expected = torch.stack([f for (_, e), f in res.robust.items() if e == eps]).all(0)
        assert torch.equal(worst, expected)  # the worst case is the per-example AND
    assert res.worst_case[("linf", 0.2)] < res.clean_acc  # the attacks did something


def test_accuracy_falls_with_eps(model, mnist5k):
    grid = [0.02, 0.1, 0.2, 0.3]
    res = evaluate_robustness(model, mnist5k.test, expand_eps(AttackConfig(name="pgd", steps=10), grid),
                              max_examples=N)
    accs = [res.accuracy["pgd"][e] for e in grid]
    assert all(b <= a for a, b in zip(accs, accs[1:], strict=False))
    assert accs[0] - accs[-1] > 0.5
    curve = res.curves()["linf"]
    assert curve.eps == grid and curve.accuracy["pgd"] == accs and curve.accuracy["worst_case"] == accs
    assert not curve.cumulative and curve.clean_acc == res.clean_acc


def test_chain_mode_gives_the_same_worst_case(model, mnist5k):
    attacks = deterministic([0.1, 0.3])
    alone = evaluate_robustness(model, mnist5k.test, attacks, max_examples=N)
    chain = evaluate_robustness(model, mnist5k.test, attacks, max_examples=N, standalone=False)
    assert chain.cumulative and not alone.cumulative
    assert chain.worst_case == alone.worst_case
    keys = chain.to_metrics()  # cumulative numbers never share a key with standalone ones
    assert "val/robust_acc_chain/bim/eps_0.3" in keys and "val/robust_acc/bim/eps_0.3" not in keys
    for tm in alone.worst_robust:
        assert torch.equal(chain.worst_robust[tm], alone.worst_robust[tm])
    for eps in (0.1, 0.3):  # cumulative: non-increasing along the chain, first attack unchanged
        chained = [chain.accuracy[c.label()][eps] for c in attacks if c.eps == eps]
        assert chained == sorted(chained, reverse=True)
        assert chain.accuracy["fgsm"][eps] == alone.accuracy["fgsm"][eps]


def test_small_batches_give_the_same_numbers_and_bound_memory(model, mnist5k, monkeypatch):
    attacks = deterministic([0.1, 0.3])
    one = evaluate_robustness(model, mnist5k.test, attacks, max_examples=N, batch_size=N)
    largest = []

    def recording(cfg, train_loss=None):
        attack = build_attack(cfg, train_loss)

        def run(m, x, y):
            largest.append(len(x))
            return attack(m, x, y)

        return run

    monkeypatch.setattr(evaluate_module, "build_attack", recording)
    many = evaluate_robustness(model, mnist5k.test, attacks, max_examples=N, batch_size=32)
    assert max(largest) <= 32  # never more than one batch of adversarial images
    assert many.to_metrics() == one.to_metrics()
    for key in one.robust:
        assert torch.equal(many.robust[key], one.robust[key])


def test_out_of_memory_halves_the_attack_batch_with_the_same_numbers(model, mnist5k, monkeypatch):
    attacks = deterministic([0.1, 0.3])
    one = evaluate_robustness(model, mnist5k.test, attacks, max_examples=N, batch_size=N)
    sizes = []

    def limited(cfg, train_loss=None):  # a device that fits 40 adversarial images at a time
        attack = build_attack(cfg, train_loss)

        def run(m, x, y):
            sizes.append(len(x))
            if len(x) > 40:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return attack(m, x, y)

        return run

    monkeypatch.setattr(evaluate_module, "build_attack", limited)
    split = evaluate_robustness(model, mnist5k.test, attacks, max_examples=N, batch_size=N)
    assert max(sizes) > 40 and 0 < min(sizes) <= 40  # tried the whole batch, then halves until it fitted
    assert split.to_metrics() == one.to_metrics()
    for key in one.robust:
        assert torch.equal(split.robust[key], one.robust[key])

    def never(cfg, train_loss=None):
        def run(m, x, y):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return run

    monkeypatch.setattr(evaluate_module, "build_attack", never)
    with pytest.raises(torch.OutOfMemoryError):  # a single example that does not fit is an error, not a loop
        evaluate_robustness(model, mnist5k.test, attacks[:1], max_examples=8, batch_size=8)


def test_seeded_random_attacks_repeat_and_leave_global_rng_alone(model, mnist5k):
    attacks = expand_eps(AttackConfig(name="pgd", steps=3), [0.1])
    state = torch.get_rng_state()
    a = evaluate_robustness(model, mnist5k.test, attacks, max_examples=100, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = evaluate_robustness(model, mnist5k.test, attacks, max_examples=100, seed=3)
    assert torch.equal(a.robust[("pgd", 0.1)], b.robust[("pgd", 0.1)])


def test_metric_keys_and_primary_eps(model, mnist5k):
    eps = [0.1 + 0.2, 8 / 255]
    attacks = (expand_eps(AttackConfig(name="fgsm"), eps) + [AttackConfig(name="fgsm", eps=1.5, norm="l2")])
    res = evaluate_robustness(model, mnist5k.test, attacks, max_examples=50)
    metrics = res.to_metrics("test")
    assert set(metrics) == {
        "test/clean_acc", "test/robust_acc/fgsm/eps_0.3", "test/robust_acc/fgsm/eps_0.031373",
        "test/robust_acc/fgsm-l2/eps_1.5", "test/robust_acc/worst_case/eps_0.3",
        "test/robust_acc/worst_case/eps_0.031373", "test/robust_acc/worst_case-l2/eps_1.5",
        "test/robust_acc/worst_case"}
    assert res.primary == ("linf", 0.1 + 0.2)  # the largest L∞ eps, not the L2 one
    assert metrics["test/robust_acc/worst_case"] == metrics["test/robust_acc/worst_case/eps_0.3"]
    other = evaluate_robustness(model, mnist5k.test, attacks, max_examples=50, primary_eps=8 / 255)
    assert other.to_metrics()["val/robust_acc/worst_case"] == other.worst_case[("linf", 8 / 255)]
    assert set(res.curves()) == {"linf", "l2"} and res.curves()["linf"].eps == sorted(eps)


def test_unbounded_eps_is_never_the_default_primary(model, mnist5k):
    attacks = [AttackConfig(name="cw_l2", eps=math.inf, steps=5, binary_search_steps=1),
               AttackConfig(name="cw_l2", eps=1.0, steps=5, binary_search_steps=1)]
    res = evaluate_robustness(model, mnist5k.test, attacks, max_examples=20)
    assert res.primary == ("l2", 1.0)
    assert "val/robust_acc/cw_l2/eps_inf" in res.to_metrics()


@pytest.mark.parametrize(("eps", "text"), [(0.1 + 0.2, "0.3"), (8 / 255, "0.031373"), (2.0, "2"),
                                           (math.inf, "inf"), (0.0, "0"), (1e-7, "1e-07")])
def test_format_eps(eps, text):
    assert format_eps(eps) == text


def test_no_attacks_gives_clean_accuracy_only(model, mnist5k):
    res = evaluate_robustness(model, mnist5k.test, [], max_examples=50)
    assert res.primary is None and set(res.to_metrics()) == {"val/clean_acc"}


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda m, d: expand_eps(AttackConfig(), []), "eps"),
        (lambda m, d: evaluate_robustness(m, d, deterministic([0.1]), primary_eps=0.2), "primary_eps"),
        (lambda m, d: evaluate_robustness(m, d, deterministic([0.1]), primary_norm="l2"), "primary_norm"),
        (lambda m, d: evaluate_robustness(m, d, [], primary_eps=0.1), "primary_eps"),
        (lambda m, d: evaluate_robustness(m, d, deterministic([0.1]), max_examples=0), "max_examples"),
        (lambda m, d: evaluate_robustness(m, d, deterministic([0.1]), batch_size=0), "batch_size"),
        (lambda m, d: evaluate_robustness(m, d, deterministic([0.1, 0.1])), "attacks"),
        (lambda m, d: evaluate_robustness(m, d, expand_eps(AttackConfig(name="fgsm"), [0.3, 0.3 + 1e-9])), "attacks"),
        (lambda m, d: evaluate_robustness(m, d, ["pgd"]), "attacks"),
        (lambda m, d: evaluate_robustness(m, d, [AttackConfig(name="fgsm", targeted=True)]), "attacks"),
    ],
)
def test_bad_input_names_the_field(model, mnist5k, call, field):
    with pytest.raises(ValueError, match=field):
        call(model, mnist5k.test)


def test_an_attack_leaving_the_ball_is_refused(model, mnist5k, monkeypatch):
    def too_far(cfg, train_loss=None):
        return lambda m, x, y: (x + 0.2).clamp(0, 1)

    monkeypatch.setattr(evaluate_module, "build_attack", too_far)
    with pytest.raises(RuntimeError, match="leave the threat model"):
        evaluate_robustness(model, mnist5k.test, [AttackConfig(name="fgsm", eps=0.1)], max_examples=20)


def test_batches_accept_splits_pairs_and_loaders(mnist5k):
    split = mnist5k.test
    xs = [x for x, _ in batches(split, 64, max_examples=100)]
    assert sum(len(x) for x in xs) == 100 and xs[0].dtype == torch.float32 and float(xs[0].max()) <= 1
    pair = (split.images.float() / 255, split.labels)
    assert torch.equal(torch.cat([x for x, _ in batches(pair, 64, max_examples=100)]), torch.cat(xs))
    from gce.data import DeviceLoader

    assert sum(len(y) for _, y in batches(DeviceLoader(split, 64), max_examples=70)) == 70


def test_silhouette_matches_sklearn(model, mnist5k):
    feats, labels = penultimate_features(model, mnist5k.test, max_examples=300)
    assert feats.shape == (300, 84)
    ours = silhouette_score(feats, labels, chunk=128)
    assert ours == pytest.approx(sk_silhouette(feats.double().numpy(), labels.numpy()), abs=1e-4)
    g = torch.Generator().manual_seed(0)
    toy = torch.randn(40, 5, generator=g)
    toy_labels = torch.tensor([0] * 20 + [1] * 19 + [2])  # class 2 is a singleton: its score is 0
    assert silhouette_score(toy, toy_labels) == pytest.approx(sk_silhouette(toy.numpy(), toy_labels.numpy()), abs=1e-6)
    with pytest.raises(ValueError, match="classes"):
        silhouette_score(toy, torch.zeros(40, dtype=torch.long))


def test_class_separation_by_hand():
    feats = torch.tensor([[0.0, 1.0], [0.0, -1.0], [4.0, 1.0], [4.0, -1.0]])
    inter, intra = class_separation(feats, torch.tensor([0, 0, 1, 1]))
    assert inter == pytest.approx(4.0) and intra == pytest.approx(1.0)


def test_embedding_and_cluster_metrics(model, mnist5k):
    clusters = latent_clusters(model, mnist5k.test, max_examples=300)
    emb = clusters.embedding
    assert emb.coords.shape == (300, 2) and emb.labels.shape == (300,)
    assert 1 >= emb.explained_variance[0] >= emb.explained_variance[1] > 0
    feats, _ = penultimate_features(model, mnist5k.test, max_examples=300)
    reference = torch.from_numpy(PCA(n_components=2).fit_transform(feats.double().numpy())).float()
    torch.testing.assert_close(emb.coords.abs(), reference.abs(), atol=1e-3, rtol=1e-3)
    assert torch.equal(pca_embedding(feats, emb.labels).coords, emb.coords)
    metrics = clusters.to_metrics("test")
    assert set(metrics) == {"test/latent/silhouette", "test/latent/inter_class", "test/latent/intra_class",
                            "test/latent/inter_intra_ratio"}
    assert -1 <= metrics["test/latent/silhouette"] <= 1 and metrics["test/latent/inter_intra_ratio"] > 0


def test_confusion_matrix_agrees_with_clean_accuracy(model, mnist5k):
    cm = confusion_matrix(model, mnist5k.test, max_examples=N)
    res = evaluate_robustness(model, mnist5k.test, [], max_examples=N)
    assert cm.shape == (10, 10) and int(cm.sum()) == N
    assert cm.trace().item() / N == pytest.approx(res.clean_acc)
    assert torch.equal(cm.sum(1), torch.bincount(next(batches(mnist5k.test, N, max_examples=N))[1], minlength=10))


def test_worst_case_never_rises_with_eps(model, mnist5k):
    """Nested balls: a point fooled at a small radius counts as fooled at every larger one."""
    attacks = expand_eps(AttackConfig(name="pgd", steps=3, step_size=0.05), [0.05, 0.1, 0.2])
    result = evaluate_robustness(model, mnist5k.test, attacks, max_examples=N)
    flags = [result.worst_robust[("linf", e)] for e in (0.05, 0.1, 0.2)]
    assert all(((b & ~a) == 0).all() for a, b in zip(flags, flags[1:], strict=False))
    accs = [result.worst_case[("linf", e)] for e in (0.05, 0.1, 0.2)]
    assert accs == sorted(accs, reverse=True)
