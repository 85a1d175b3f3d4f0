"""Merge methods: one file per method, each a pure function on aligned tensors, registered by name."""

from mergelab.methods import (  # noqa: F401  (importing registers the methods)
    arcee_fusion,
    breadcrumbs,
    cart,
    dare,
    della,
    fisher,
    iso_c,
    iso_cts,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    regmean,
    sce,
    slerp,
    task_arithmetic,
    ties,
    tsv,
    wudi,
)
from mergelab.methods.arcee_fusion import arcee_fusion_merge
from mergelab.methods.breadcrumbs import breadcrumbs_merge
from mergelab.methods.cart import cart_merge
from mergelab.methods.dare import dare_merge
from mergelab.methods.della import della_merge
from mergelab.methods.fisher import fisher_merge
from mergelab.methods.iso_c import iso_c_merge
from mergelab.methods.iso_cts import iso_cts_merge
from mergelab.methods.karcher import karcher_merge
from mergelab.methods.linear import linear_merge
from mergelab.methods.model_stock import model_stock_merge
from mergelab.methods.multislerp import multislerp_merge
from mergelab.methods.nearswap import nearswap_merge
from mergelab.methods.nuslerp import nuslerp_merge
from mergelab.methods.passthrough import passthrough_merge
from mergelab.methods.registry import (
    MergeMethod,
    Param,
    TensorInputs,
    all_methods,
    get_method,
    list_methods,
    register,
)
from mergelab.methods.regmean import regmean_merge
from mergelab.methods.sce import sce_merge
from mergelab.methods.slerp import slerp_merge
from mergelab.methods.task_arithmetic import task_arithmetic_merge
from mergelab.methods.ties import ties_merge
from mergelab.methods.tsv import tsv_merge
from mergelab.methods.wudi import wudi_merge

__all__ = [
    "MergeMethod",
    "Param",
    "TensorInputs",
    "all_methods",
    "arcee_fusion_merge",
    "breadcrumbs_merge",
    "cart_merge",
    "dare_merge",
    "della_merge",
    "fisher_merge",
    "get_method",
    "iso_c_merge",
    "iso_cts_merge",
    "karcher_merge",
    "linear_merge",
    "list_methods",
    "model_stock_merge",
    "multislerp_merge",
    "nearswap_merge",
    "nuslerp_merge",
    "passthrough_merge",
    "register",
    "regmean_merge",
    "sce_merge",
    "slerp_merge",
    "task_arithmetic_merge",
    "ties_merge",
    "tsv_merge",
    "wudi_merge",
]
