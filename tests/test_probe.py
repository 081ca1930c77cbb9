"""The two probe protocols: each separates what is separable, neither finds what is not, and
the Adam protocol is deterministic (seeded shuffling and initialisation)."""

import torch

from edge.probe import fit_linear, fit_linear_adam


def test_both_protocols_separate_clusters_and_find_nothing_in_noise():
    gen = torch.Generator().manual_seed(1)  # ten Gaussian clusters in 20-d, 4 sigma apart
    means = 4.0 * torch.randn(10, 20, generator=gen)
    ytr, yte = torch.randint(0, 10, (2000,), generator=gen), torch.randint(0, 10, (1000,),
                                                                          generator=gen)
    xtr = means[ytr] + torch.randn(2000, 20, generator=gen)
    xte = means[yte] + torch.randn(1000, 20, generator=gen)
    for fit in (fit_linear, fit_linear_adam):
        assert fit(xtr, ytr, xte, yte, 10) > 0.95, fit.__name__
        noise = torch.randint(0, 10, (2000,), generator=gen)
        assert fit(xtr, noise, xte, yte, 10) < 0.2, fit.__name__  # chance is 0.1


def test_adam_protocol_is_deterministic_and_its_epochs_matter():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5000, 30, generator=gen)  # four classes cut by two hyperplanes
    y = (x[:, :3].sum(1) > 0).long() + 2 * (x[:, 3] > 0).long()
    split = (x[:4000], y[:4000], x[4000:], y[4000:], 4)
    a = fit_linear_adam(*split)
    assert a == fit_linear_adam(*split) and a > 0.85
    assert fit_linear_adam(*split, epochs=0) < a - 0.3  # the untrained layer: near chance
