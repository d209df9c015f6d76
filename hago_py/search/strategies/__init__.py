"""Search strategies over the per-layer estimates: greedy path, integer program, refinement."""
from .greedy import greedy_path, hull, sensitivity_order
from .milp import solve as milp_solve
from .refine import accurate_moves, faster_moves, top_candidates
from .table import Table

__all__ = ["Table", "greedy_path", "hull", "sensitivity_order", "milp_solve", "faster_moves", "accurate_moves",
           "top_candidates"]
