"""rotelab.train"""
