"""rotelab.tui"""
