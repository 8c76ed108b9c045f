"""Aggregate run directories into paper tables and figures (`make tables`)."""
