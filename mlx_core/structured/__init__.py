"""Structured outputs: constrain a row's next token to a JSON schema, regex, choice or grammar.

`vocab` turns our sentencepiece vocabulary into llguidance's tokenizer (once per model),
`constraints` compiles a request's constraint into a grammar (cached), `matcher` keeps one
sequence's place in its grammar and masks a batch of logits, `healing` backs off a prompt's last
token and constrains the first generated ones to spell it again.
"""

from .constraints import Constraint, ConstraintError, compile_grammar, lark_grammar, with_prefix
from .healing import Healing, HealingMatcher, PrefixStripper, heal_prompt
from .matcher import MaskBatch, MaskComputer, RowMatcher, TokenConstraint, TokenMasks, apply_masks
from .vocab import Vocabulary, vocabulary

__all__ = [
    "Constraint",
    "ConstraintError",
    "Healing",
    "HealingMatcher",
    "MaskBatch",
    "MaskComputer",
    "PrefixStripper",
    "RowMatcher",
    "TokenConstraint",
    "TokenMasks",
    "Vocabulary",
    "apply_masks",
    "compile_grammar",
    "heal_prompt",
    "lark_grammar",
    "vocabulary",
    "with_prefix",
]
