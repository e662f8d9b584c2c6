"""Registry of privacy accountants: one file plus one line in ``_ACCOUNTANTS`` each."""

from __future__ import annotations

from privacy._registry import Registry
from privacy.accounting.base import Accountant
from privacy.accounting.prv import PRVAccountant
from privacy.accounting.rdp import RDPAccountant

_ACCOUNTANTS: Registry[Accountant] = Registry(
    "privacy accountant",
    "privacy.accountants",
    {
        "rdp": RDPAccountant,
        "prv": PRVAccountant,
    },
)

#: ``register_accountant(name, cls, force=False)``: add a plug-in class (its ``name`` attribute must match).
register_accountant = _ACCOUNTANTS.register
#: ``create_accountant(name, **kwargs)``: instantiate the accountant registered under ``name``.
create_accountant = _ACCOUNTANTS.create
#: ``available()``: the registered names, sorted.
available = _ACCOUNTANTS.names
#: ``plugin_class(name)``: the class registered under ``name`` (its settings are its keyword arguments).
plugin_class = _ACCOUNTANTS.get
