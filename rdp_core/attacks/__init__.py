"""Attacks on any `nn.Module` that maps images in [0, 1] to logits, randomized defenses included.

* `pgd_eot`: projected gradient descent with expectation over transformation (l_inf and l_2), the
  full-gradient attack of the diffusion-purification literature; BPDA+EOT is the same loop run on a
  `Purifier(grad="bpda")`.
* `autoattack`: AutoAttack's `standard` (APGD-CE, APGD-T, FAB-T, Square) and `rand` (APGD-CE and APGD-DLR
  with EOT) ensembles, from torchattacks' implementations of the individual attacks (optional dependency).
* `predict_votes`, `eot_loss_gradient`: the building blocks, N independent forwards of a randomized model.
"""
from rdp_core.attacks.autoattack import AUTOATTACK_VERSIONS, autoattack
from rdp_core.attacks.eot import eot_loss_gradient, predict_votes
from rdp_core.attacks.pgd import NORMS, PGDResult, pgd_eot

__all__ = ["AUTOATTACK_VERSIONS", "NORMS", "PGDResult", "autoattack", "eot_loss_gradient", "pgd_eot",
           "predict_votes"]
