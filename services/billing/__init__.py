"""Billing: keys, balances, prices, reservations, settlement and the double-entry ledger, in Postgres."""
