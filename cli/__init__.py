"""arcflow.cli"""
