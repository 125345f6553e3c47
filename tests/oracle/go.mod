module vlg-oracle

go 1.21
