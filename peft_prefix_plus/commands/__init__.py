"""Sub-commands of the ``prefix-plus`` command line, one module each (see :mod:`peft_prefix_plus.cli`)."""
