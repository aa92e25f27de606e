"""Section: the base of every recipe section (model, data, lighthouse, ...), declared where each
section's dataclass lives; lh_cp/train/recipe.py assembles them into a Recipe."""

from __future__ import annotations


class Section:
    """Mixin of the recipe's config sections: `problems()` lists every rule the section breaks
    on its own (each message names the key and the numbers); `validate()` raises them. Rules
    that relate several sections live in lh_cp/train/plan.py (check_recipe)."""

    def problems(self) -> list[str]:
        raise NotImplementedError

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))
