"""Jinja templates of the cards hf-pds writes, shipped inside the wheel as ``hf_pds.model_card_templates``."""
