"""rotelab.analyses"""
