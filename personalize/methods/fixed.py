"""FedAvg and the partial-personalization baselines: plain FedAvg training with a fixed set of local parts."""

from __future__ import annotations

from fedsens.personalize.methods.base import Method
from fedsens.personalize.methods.registry import register_method


@register_method
class FedAvg(Method):
    """FedAvg: everything averaged, or the parts `--personalize` names kept local."""

    name, paper_row = "fedavg", 1
    paper_label = "FedAvg"
    summary = "plain local SGD, sample-weighted averaging; --personalize keeps parts local"
    paper = "McMahan et al., Communication-Efficient Learning of Deep Networks from Decentralized Data, AISTATS 2017"


@register_method
class Local(Method):
    """Every client trains alone: every parameter is local, nothing is exchanged (0 bytes)."""

    name, paper_row, parts = "local", 2, "all"
    paper_label = "Local"
    summary = "every client trains alone; nothing is sent"
    paper = "the local-only baseline"


@register_method
class FedBN(Method):
    """FedBN: the normalisation layers stay local (on a ViT: every LayerNorm)."""

    name, paper_row, parts = "fedbn", 3, "norm"
    paper_label = "FedBN"
    summary = "the normalisation layers stay local"
    paper = "Li et al., FedBN: Federated Learning on Non-IID Features via Local Batch Normalization, ICLR 2021"


@register_method
class FedPer(Method):
    """FedPer: the classification head stays local, everything else is averaged."""

    name, paper_row, parts = "fedper", 4, "head"
    paper_label = "FedRep (public code)"
    summary = "the classification head stays local"
    paper = "Arivazhagan et al., Federated Learning with Personalization Layers, arXiv:1912.00818, 2019"


@register_method
class VanillaAttention(Method):
    """The paper's "vanilla attention" baseline: every self-attention layer and the head stay local."""

    name, paper_row, parts = "vanilla-attention", 9, "attn,head"
    paper_label = "Vanilla attention"
    summary = "every self-attention layer and the head stay local"
    paper = "Sun et al., FedPerfix, ICCV 2023 (its vanilla-attention baseline)"
