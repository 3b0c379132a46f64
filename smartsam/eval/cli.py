def add_eval_parser(sub):
    pass
