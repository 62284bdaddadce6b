from lowcomm.cli import main

main()
