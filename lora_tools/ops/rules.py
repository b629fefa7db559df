"""Kept so that ``from lora_tools.ops.rules import ...`` still works: the rule catalogue lives in
:mod:`lora_tools.ops.validate.rules`, next to the checks that produce its findings.
"""

from lora_tools.ops.validate.rules import (
    CATEGORIES,
    ERROR,
    INFO,
    PROBLEM_RULES,
    RULES,
    SEVERITIES,
    SEVERITY_RANK,
    WARNING,
    Rule,
    at_least,
    get_rule,
    select_rules,
    split_selectors,
)

__all__ = [
    "CATEGORIES",
    "ERROR",
    "INFO",
    "PROBLEM_RULES",
    "RULES",
    "SEVERITIES",
    "SEVERITY_RANK",
    "WARNING",
    "Rule",
    "at_least",
    "get_rule",
    "select_rules",
    "split_selectors",
]
