from qatflash.cli import bench_main

bench_main()
