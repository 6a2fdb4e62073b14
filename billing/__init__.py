"""Monthly invoices built on the rollups: pricing, month close, exports.

Imports ``metering``; ``metering`` never imports it.
"""
