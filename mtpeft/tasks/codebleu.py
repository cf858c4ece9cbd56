"""CodeBLEU (Ren et al., 2020) for Python, on the standard library's ``ast`` instead of tree-sitter.

Four corpus-level components, combined with weights (α, β, γ, δ):
n-gram match (``metrics.bleu``), keyword-weighted n-gram match, AST subtree match and a
simplified def-use data-flow match. No compiled grammar is needed, so the metric runs anywhere
the trainer runs; docs/METRICS.md lists where it differs from the reference implementation.
"""

from __future__ import annotations

import ast
import keyword
import math
from collections import Counter
from typing import Sequence

from mtpeft.errors import ConfigError
from mtpeft.tasks.metrics import check_same_length, log_brevity_penalty, ngram_counts, bleu, code_tokenize

KEYWORD_WEIGHT = 5.0
PYTHON_KEYWORDS = frozenset(keyword.kwlist)

# Node kinds that are leaves decorating their parent (Load/Store, +, and, ==): part of the parent's
# shape, never a subtree of their own (tree-sitter's anonymous nodes play this role in CodeBLEU).
_NOT_SUBTREE_ROOTS = (ast.expr_context, ast.boolop, ast.operator, ast.unaryop, ast.cmpop)


def weighted_ngram_match(preds: Sequence[str], refs: Sequence[str], max_n: int = 4, smooth: bool = True) -> float:
    """Keyword-weighted n-gram match: CodeBLEU's BLEU_weight.

    As in CodeBLEU's implementation it is recall-like (clipped matches over the reference's
    n-grams), unigrams weigh KEYWORD_WEIGHT for Python keywords and 1 otherwise, higher orders are
    unweighted; smoothing and brevity penalty follow ``metrics.bleu``.
    """
    check_same_length(preds, refs, "weighted_ngram_match")
    num = [0.0] * max_n
    den = [0.0] * max_n
    hyp_len = ref_len = 0
    for pred, ref in zip(preds, refs):
        hyp, gold = code_tokenize(pred), code_tokenize(ref)
        hyp_len += len(hyp)
        ref_len += len(gold)
        for n in range(1, max_n + 1):
            h, r = ngram_counts(hyp, n), ngram_counts(gold, n)
            for gram, count in r.items():
                w = (KEYWORD_WEIGHT if gram[0] in PYTHON_KEYWORDS else 1.0) if n == 1 else 1.0
                num[n - 1] += w * min(count, h[gram])
                den[n - 1] += w * count
    log_p = 0.0
    for n in range(1, max_n + 1):
        add = 1.0 if smooth and n > 1 else 0.0
        if num[n - 1] + add == 0 or den[n - 1] + add == 0:
            return 0.0
        log_p += math.log((num[n - 1] + add) / (den[n - 1] + add))
    log_bp = log_brevity_penalty(ref_len, hyp_len)
    return math.exp(log_bp + log_p / max_n) if log_bp > -math.inf else 0.0


def _parse(code: str) -> ast.AST | None:
    try:
        return ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def ast_subtrees(tree: ast.AST, intern: dict) -> Counter:
    """Multiset of the tree's subtree shapes: node kinds only, identifiers and constants dropped.

    Each distinct shape is interned to an int (shape = (kind, child shape ids)), so equal subtrees
    compare in O(1) and long programs do not build quadratic-size strings.
    """
    found: Counter = Counter()

    def shape(node: ast.AST) -> int:
        children = []
        for _, value in ast.iter_fields(node):
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.expr_context) or not isinstance(child, ast.AST):
                    continue
                children.append(shape(child))
        sid = intern.setdefault((type(node).__name__, tuple(children)), len(intern))
        if not isinstance(node, _NOT_SUBTREE_ROOTS):
            found[sid] += 1
        return sid

    shape(tree)
    return found


class _DataFlow(ast.NodeVisitor):
    """Def-use edges over Name nodes, visiting right-hand sides before the names they bind."""

    def __init__(self) -> None:
        self.edges: list[tuple[str, str, tuple[str, ...]]] = []
        self.defined: set[str] = set()
        self.sources: tuple[str, ...] = ()

    @staticmethod
    def reads(*nodes: ast.AST | None) -> tuple[str, ...]:
        names = [
            n.id for node in nodes if node is not None for n in ast.walk(node)
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
        ]
        return tuple(dict.fromkeys(names))

    def bind(self, target: ast.AST, sources: tuple[str, ...]) -> None:
        saved, self.sources = self.sources, sources
        self.visit(target)
        self.sources = saved

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self.edges.append((node.id, "comesFrom", (node.id,) if node.id in self.defined else ()))
        else:
            self.edges.append((node.id, "computedFrom", self.sources))
            self.defined.add(node.id)

    def visit_arg(self, node: ast.arg) -> None:
        self.generic_visit(node)
        self.edges.append((node.arg, "computedFrom", ()))
        self.defined.add(node.arg)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for target in node.targets:
            self.bind(target, self.reads(node.value))

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.visit(node.value)
        self.bind(node.target, self.reads(node.value) + tuple(self.reads_target(node.target)))

    @staticmethod
    def reads_target(target: ast.AST) -> list[str]:
        return [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.visit(node.annotation)
        if node.value is not None:
            self.visit(node.value)
        self.bind(node.target, self.reads(node.value))

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self.bind(node.target, self.reads(node.value))

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        self.visit(node.iter)
        self.bind(node.target, self.reads(node.iter))
        for stmt in node.body + node.orelse:
            self.visit(stmt)

    visit_AsyncFor = visit_For

    def visit_withitem(self, node: ast.withitem) -> None:
        self.visit(node.context_expr)
        if node.optional_vars is not None:
            self.bind(node.optional_vars, self.reads(node.context_expr))

    def visit_comprehension(self, node: ast.comprehension) -> None:
        self.visit(node.iter)
        self.bind(node.target, self.reads(node.iter))
        for cond in node.ifs:
            self.visit(cond)

    def _visit_comp(self, node: ast.AST, *parts: str) -> None:
        for gen in node.generators:
            self.visit(gen)
        for part in parts:
            self.visit(getattr(node, part))

    def visit_ListComp(self, node: ast.ListComp) -> None:
        self._visit_comp(node, "elt")

    visit_SetComp = visit_GeneratorExp = visit_ListComp

    def visit_DictComp(self, node: ast.DictComp) -> None:
        self._visit_comp(node, "key", "value")


def dataflow_edges(tree: ast.AST) -> Counter:
    """Multiset of def-use edges with variables renamed by first appearance (var0, var1, ...)."""
    flow = _DataFlow()
    flow.visit(tree)
    rename: dict[str, int] = {}
    edges: Counter = Counter()
    for var, relation, parents in flow.edges:
        for name in (var, *parents):
            rename.setdefault(name, len(rename))
        edges[(rename[var], relation, tuple(sorted(rename[p] for p in parents)))] += 1
    return edges


def _clipped(ref: Counter, cand: Counter) -> int:
    return sum(min(count, cand[key]) for key, count in ref.items())


def codebleu(
    preds: Sequence[str],
    refs: Sequence[str],
    weights: tuple[float, float, float, float] = (0.25, 0.25, 0.25, 0.25),
    lang: str = "python",
) -> dict:
    """Corpus CodeBLEU and its components.

    Returns ``{codebleu, ngram, weighted_ngram, syntax, dataflow}``. Unparsable candidates score 0
    on syntax and data flow; unparsable references are left out of those two. A component with
    nothing to measure (no reference parses, or no reference has a variable) is None and the
    weights of the others are renormalised, rather than silently counting it as 0 or 1.
    """
    if lang != "python":
        raise ConfigError(f"codebleu: lang={lang!r} is not supported; only 'python' (syntax and data flow use Python's ast)")
    if len(weights) != 4 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"codebleu: weights={tuple(weights)} must be 4 non-negative numbers with a positive sum")
    check_same_length(preds, refs, "codebleu")
    intern: dict = {}
    syn_match = syn_total = df_match = df_total = 0
    parsed_refs = 0
    for pred, ref in zip(preds, refs):
        ref_tree = _parse(ref)
        if ref_tree is None:
            continue
        parsed_refs += 1
        ref_sub, ref_df = ast_subtrees(ref_tree, intern), dataflow_edges(ref_tree)
        syn_total += sum(ref_sub.values())
        df_total += sum(ref_df.values())
        pred_tree = _parse(pred)
        if pred_tree is not None:
            syn_match += _clipped(ref_sub, ast_subtrees(pred_tree, intern))
            df_match += _clipped(ref_df, dataflow_edges(pred_tree))
    scores = {
        "ngram": bleu(preds, refs),
        "weighted_ngram": weighted_ngram_match(preds, refs),
        "syntax": syn_match / syn_total if parsed_refs and syn_total else None,
        "dataflow": df_match / df_total if df_total else None,
    }
    used = [(w, s) for w, s in zip(weights, scores.values()) if s is not None]
    total_w = sum(w for w, _ in used)
    scores["codebleu"] = sum(w * s for w, s in used) / total_w if total_w > 0 else 0.0
    return {"codebleu": scores["codebleu"], **{k: scores[k] for k in ("ngram", "weighted_ngram", "syntax", "dataflow")}}
