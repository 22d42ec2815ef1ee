"""The ground floor: what every stage speaks, importing no stage.

`contract` (CellSpec, CellRecord and their vocabularies), `flags` (OffloadFlags and its pure arithmetic),
`records` (the JSON-lines records file), `units`, `locations` and `exitcodes`. tests/test_import_rules.py holds
the rule.
"""
