"""DOT-MoE config (written by `dotmoe export`): the stock __BASE_CLASS__Config with `dotmoe_gating`."""

from transformers import __BASE_CLASS__Config


class DotMoeConfig(__BASE_CLASS__Config):
    model_type = "dotmoe___BASE__"
