"""rotelab.probe"""
