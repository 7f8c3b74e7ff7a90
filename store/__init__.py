"""rotelab.store"""
