"""Samplers over one noise schedule, reading diffusers' scheduler_config.json.

INTERFACE (the pipeline depends on exactly this; being implemented):

    make_scheduler(name: str | None, config: dict) -> Scheduler
        name: "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "pndm" or None
        (None: the checkpoint's own scheduler, from config["_class_name"], where supported).
    SCHEDULERS: tuple of the names above.

    class Scheduler:
        name: str
        stochastic: bool            # step() needs fresh standard-normal noise (euler_a)
        prediction_type: str        # "epsilon" | "v_prediction"
        timesteps: np.ndarray       # after set_timesteps: one UNet timestep per model evaluation
        def set_timesteps(self, num_inference_steps: int) -> None   # also resets multistep state
        def img2img_start(self, num_inference_steps: int, strength: float) -> int
            # index into self.timesteps where img2img begins (diffusers' t_start * order);
            # ValueError naming a strength / step count that works when no step would run
        def add_noise(self, x0: mx.array, noise: mx.array, index: int) -> mx.array
        def scale_model_input(self, x: mx.array, index: int) -> mx.array
        def step(self, model_output: mx.array, index: int, x: mx.array,
                 noise: mx.array | None = None) -> mx.array
"""
