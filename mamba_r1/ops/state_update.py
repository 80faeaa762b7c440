def selective_state_update(*args, **kwargs):
    raise NotImplementedError
