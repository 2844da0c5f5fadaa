"""Built-in aggregation strategies, each written only against the public
``fedtrain`` API (so each is also an example of a plug-in). Load them by name
with :func:`fedtrain.load_strategy`:

- ``fedavg``       :class:`strategies.fedavg.FedAvg` — weighted model averaging (McMahan et al. 2017)
- ``fedprox``      :class:`strategies.fedprox.FedProx` — FedAvg plus a proximal local term (Li et al. 2020)
- ``fedavgm``      :class:`strategies.fedavgm.FedAvgM` — server momentum (Hsu et al. 2019)
- ``fedadam``      :class:`strategies.fedadam.FedAdam` — server Adam (Reddi et al. 2021)
- ``fedadagrad``   :class:`strategies.fedadagrad.FedAdagrad` — server Adagrad (Reddi et al. 2021)
- ``fedyogi``      :class:`strategies.fedyogi.FedYogi` — server Yogi (Reddi et al. 2021)
- ``fedmedian``    :class:`strategies.fedmedian.FedMedian` — coordinate-wise median (Yin et al. 2018)
- ``trimmed_mean`` :class:`strategies.trimmed_mean.TrimmedMean` — coordinate-wise trimmed mean (Yin et al. 2018)
- ``krum``         :class:`strategies.krum.Krum` — Krum (Blanchard et al. 2017)
- ``multi_krum``   :class:`strategies.krum.MultiKrum` — Multi-Krum (Blanchard et al. 2017)
- ``fedsgd``       :class:`strategies.fedsgd.FedSGD` — gradient aggregation (McMahan et al. 2017)
"""
