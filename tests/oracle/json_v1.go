//go:build !goexperiment.jsonv2

package main

const jsonImplementation = "encoding/json (v1)"
