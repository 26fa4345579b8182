"""Pure-torch MoE model code, split into an attention part and an expert part. No RPC imports."""

from asap.model.attention_part import AttentionPart, MoERequest
from asap.model.expert_part import ExpertPart
from asap.model.placement import ExpertPlacement, InProcessExperts, RankDispatch, combine, split_by_rank
from asap.model.sampling import FirstToken, first_token

__all__ = [
    "AttentionPart",
    "ExpertPart",
    "ExpertPlacement",
    "FirstToken",
    "InProcessExperts",
    "MoERequest",
    "RankDispatch",
    "combine",
    "first_token",
    "split_by_rank",
]
